"""Example tool: the current date and time, here or in a named time zone (the IANA database through zoneinfo).

Copy this file into user_data/tools/ to change it: a tool there with the same name replaces this one.
"""
from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def current_datetime(timezone: str = "") -> dict[str, str]:
    """The current date and time, with the weekday and the offset from UTC.

    Args:
        timezone: An IANA time zone such as "Europe/Paris", "America/New_York" or "UTC"; empty for the time zone
            of the computer running the chat.
    """
    if timezone.strip():
        try:
            zone = ZoneInfo(timezone.strip())
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r}; use an IANA name such as Europe/Paris or UTC") from None
        now = datetime.now(zone)
        name = timezone.strip()
    else:
        now = datetime.now().astimezone()
        name = now.tzname() or "local"
    return {"datetime": now.isoformat(timespec="seconds"), "weekday": now.strftime("%A"), "timezone": name,
            "utc_offset": now.strftime("%z")[:3] + ":" + now.strftime("%z")[3:]}
