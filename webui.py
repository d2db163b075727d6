"""Start the workbench: flags + settings.yaml -> Settings -> services -> the Gradio app (and the API).

Bad input (a flag's value, the settings file, a name that names nothing, an address the UI cannot bind) ends the
start with one line on stderr and exit status 2 before any model loads (modules.cli). A model that exists but
fails to load is not bad input: the UI starts and says why.
"""
from __future__ import annotations

import logging
import socket
import sys
from typing import Any


def check_address(host: str, port: int) -> None:
    """Refuse a UI address that cannot be bound now (a port in use, a host that is no address here), before a
    model spends minutes loading."""
    from modules.errors import ConfigError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(f"Cannot serve the web UI on {host}:{port}: {exc.strerror or exc}.") from None


def check_names(settings: Any) -> None:
    """The extensions, preset and LoRAs the settings name must exist."""
    from modules.errors import ConfigError
    from modules.extensions import ExtensionRegistry
    from modules.paths import resolve_inside
    from modules.presets import load_preset

    available = ExtensionRegistry().available()
    unknown = [name for name in settings.extensions if name not in available]
    if unknown:
        raise ConfigError(f"No extension named {', '.join(map(repr, unknown))} in extensions/ (available: "
                          f"{', '.join(available) or 'none'}).")
    load_preset(settings.preset_dir, settings.preset)
    for name in settings.lora:
        resolve_inside(settings.lora_dir, name, what="LoRA", must_exist=True)


def check_model(settings: Any, manager: Any) -> None:
    """The loader and the model the settings name must exist (a name or alias of user_data/models.yaml counts),
    with good options. With a forced loader it runs once the extensions started: they may add loaders."""
    loader = manager.registry.get(settings.loader) if settings.loader else None
    if settings.model and settings.model.lower() != "none" and (loader is None or loader.local_files):
        manager.check(settings.model, settings.loader)


def main(argv: list[str] | None = None) -> int:
    from modules.cli import report
    from modules.errors import ConfigError, WorkbenchError
    from modules.extensions import start_extensions
    from modules.services import build_services, load_startup_model, start_toolbox
    from modules.settings import load_settings

    try:
        settings = load_settings(argv)
        check_address(settings.host, settings.listen_port)
        check_names(settings)
        services = build_services(settings)
        if not settings.loader:
            check_model(settings, services.manager)
        from modules.ui.app import auth_pairs, launch

        auth_pairs(settings)
    except WorkbenchError as exc:
        return report(exc)
    logging.basicConfig(level=logging.DEBUG if settings.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start_extensions(services)  # --extensions / --api: hooks, and the API on --api-port
    if settings.loader:  # an extension may have added it
        try:
            check_model(settings, services.manager)
        except WorkbenchError as exc:
            return report(exc)
    # The UI was imported above, before the model loads: loading the model in a thread while the UI was imported
    # made two threads import transformers at once, and its lazy modules then came back partially initialized
    # (ImportError at start-up). Overlapping them saved under half a second for a GGUF model.
    start_toolbox(services)  # tool files now; MCP servers connect in the background
    load_startup_model(services)
    try:
        return launch(services)
    except OSError as exc:  # the port was taken while the model loaded
        return report(ConfigError(f"Cannot serve the web UI on {settings.host}:{settings.listen_port}: {exc}"))
    finally:
        services.close()  # MCP sessions and stdio servers end with the app


if __name__ == "__main__":
    sys.exit(main())
