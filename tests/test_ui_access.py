"""The Gradio-free parts of who may reach what: a user's chats folder, the sign-in throttle's policy (on a clock the
test turns), who may use the operator's controls and how anyone else is refused, and where a request names a page
session. The same pieces run
behind a real server in test_ui_auth.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from modules.errors import AccessDenied
from modules.model_manager import ModelManager
from modules.services import Services
from modules.settings import Settings
from modules.ui.access import may_administer, refuse_unless_admin, session_hashes
from modules.ui.login_throttle import LoginThrottle
from modules.ui.session_state import UiSession, chats_root, user_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def services_for(tmp_path: Path, **settings: object) -> Services:
    values = Settings(user_data_dir=tmp_path / "user_data", model_dir=tmp_path, **settings)
    return Services(settings=values, manager=ModelManager(tmp_path, tmp_path))


@pytest.mark.parametrize("name", ["alice", "Alice", "../../etc", "a/b", "..", "名前", " ", "x" * 300, "C:\\x"])
def test_a_user_name_becomes_one_folder_inside_user_data(tmp_path: Path, name: str) -> None:
    services = services_for(tmp_path, multi_user=True)
    root = chats_root(services, "ignored-browser-id", name)
    users = (tmp_path / "user_data" / "users").resolve()
    assert root.resolve().parent.parent.parent == users  # users/<key>/logs/chat
    assert root.parent.parent.name == user_key(name)
    assert all(c.isalnum() and c.isascii() or c == "-" for c in user_key(name))


def test_user_names_that_differ_only_in_case_or_punctuation_get_different_folders() -> None:
    names = ["alice", "Alice", "ALICE", "al.ice", "al-ice", "al ice"]
    assert len({user_key(n) for n in names}) == len(names)
    assert user_key("alice") == user_key("alice")  # stable: her chats are found again


def test_the_chats_of_a_signed_in_user_follow_her_not_the_browser(tmp_path: Path) -> None:
    services = services_for(tmp_path, multi_user=True)
    first = UiSession.start(services, "browser-one-aaaaaaaaaaaaaaaaaaaa", user="alice")
    first.history = first.store.new(first.character, [{"role": "user", "content": "pineapple"}])
    elsewhere = UiSession.start(services, "browser-two-bbbbbbbbbbbbbbbbbbbb", user="alice")
    other = UiSession.start(services, "browser-one-aaaaaaaaaaaaaaaaaaaa", user="bob")
    assert [item.id for item in elsewhere.store.list_chats(first.character).items] == [first.history.id]
    assert other.store.list_chats(first.character).items == []


def test_without_multi_user_every_page_shares_one_chats_folder(tmp_path: Path) -> None:
    services = services_for(tmp_path)
    assert chats_root(services, "x" * 32, "alice") == chats_root(services, "y" * 32, None) == services.chat_root


def test_after_a_few_failures_sign_in_pauses_and_each_further_failure_doubles_the_pause() -> None:
    clock = Clock()
    throttle = LoginThrottle(free=3, base_s=10, max_s=60, clock=clock)
    for _ in range(2):
        throttle.failed("10.0.0.1", "carol")
        assert throttle.wait_s("10.0.0.1", "carol") == 0
    throttle.failed("10.0.0.1", "carol")
    assert throttle.wait_s("10.0.0.1", "carol") == 10
    assert throttle.wait_s("10.0.0.9", "carol") == 10  # the user name, from anywhere
    assert throttle.wait_s("10.0.0.1", "bob") == 10  # the address, for any name
    assert throttle.wait_s("10.0.0.9", "bob") == 0
    clock.now += 10
    assert throttle.wait_s("10.0.0.1", "carol") == 0  # the pause is over: one more try
    throttle.failed("10.0.0.1", "carol")
    assert throttle.wait_s("10.0.0.1", "carol") == 20
    for _ in range(5):
        clock.now += 60
        throttle.failed("10.0.0.1", "carol")
    assert throttle.wait_s("10.0.0.1", "carol") == 60  # capped


def test_the_right_password_clears_the_user_name_but_not_the_address() -> None:
    clock = Clock()
    throttle = LoginThrottle(free=2, base_s=10, clock=clock)
    throttle.failed("10.0.0.1", "carol")
    throttle.failed("10.0.0.1", "carol")
    clock.now += 10
    throttle.succeeded("carol")
    assert throttle.wait_s("10.0.0.9", "carol") == 0
    throttle.failed("10.0.0.1", "dave")  # the address's count goes on: paused again at once
    assert throttle.wait_s("10.0.0.1", "erin") == 20


def test_failures_are_forgotten_after_a_quiet_hour() -> None:
    clock = Clock()
    throttle = LoginThrottle(free=2, base_s=10, forget_s=3600, clock=clock)
    throttle.failed("10.0.0.1", "carol")
    clock.now += 3601
    throttle.failed("10.0.0.1", "carol")
    assert throttle.wait_s("10.0.0.1", "carol") == 0


def test_the_throttle_keeps_a_bounded_number_of_keys() -> None:
    throttle = LoginThrottle(limit=100, clock=Clock())
    for number in range(1000):
        throttle.failed("10.0.0.1", f"guess-{number}")
    assert len(throttle._keys) <= 100


@pytest.mark.parametrize(("multi_user", "admin_ui", "user", "allowed"), [
    (False, False, None, True), (True, False, None, False), (True, False, "bob", False),
    (True, False, "alice", True), (True, True, None, True), (True, True, "bob", True)])
def test_who_may_use_the_operator_controls(multi_user: bool, admin_ui: bool, user: str | None,
                                           allowed: bool) -> None:
    settings = Settings(multi_user=multi_user, admin_ui=admin_ui, admin_users=["alice"])
    assert may_administer(settings, user) is allowed


def test_an_operator_action_is_refused_by_kind_and_the_message_names_the_flags() -> None:
    settings = Settings(multi_user=True, admin_users=["alice"])
    with pytest.raises(AccessDenied) as refused:
        refuse_unless_admin(settings, "bob", "Loading a model")
    assert str(refused.value).startswith("Loading a model is for the operator")
    assert "--admin-users" in str(refused.value) and "--admin-ui" in str(refused.value)
    assert refused.value.status_code == 403
    with pytest.raises(AccessDenied):
        refuse_unless_admin(settings, None, "Loading a model")  # a page nobody signed in to
    refuse_unless_admin(settings, "alice", "Loading a model")
    refuse_unless_admin(Settings(), None, "Loading a model")  # without --multi-user every page is the operator's


@pytest.mark.parametrize(("path", "query", "body", "expected"), [
    ("/gradio_api/queue/join", b"", {"session_hash": "abc", "data": []}, {"abc"}),
    ("/gradio_api/queue/data", b"session_hash=abc", None, {"abc"}),
    ("/gradio_api/heartbeat/abc", b"", None, {"abc"}),
    ("/gradio_api/stream/abc/run1/7/playlist.m3u8", b"", None, {"abc"}),
    ("/gradio_api/stream/event-id", b"", {"data": []}, set()),  # an event id, not a session
    ("/gradio_api/call/export_chat", b"", {"data": [], "session_hash": "abc"}, {"abc"}),
    ("/gradio_api/deep_link", b"session_hash=abc&x=1", None, {"abc"}),
    ("/gradio_api/info", b"", None, set()),
])
def test_where_a_request_names_a_page_session(path: str, query: bytes, body: dict | None,
                                             expected: set[str]) -> None:
    scope = {"path": path, "query_string": query}
    assert session_hashes(scope, json.dumps(body).encode() if body is not None else b"") == expected
