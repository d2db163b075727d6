"""Start the workbench: flags + settings.yaml -> Settings -> services -> the Gradio app (and the API)."""
from __future__ import annotations

import logging
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    from modules.errors import WorkbenchError
    from modules.settings import load_settings

    try:
        settings = load_settings(argv)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if settings.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from modules.extensions import start_extensions
    from modules.services import build_services, load_startup_model

    services = build_services(settings)
    start_extensions(services)  # --extensions / --api: hooks, and the API on --api-port
    # The model loads while Gradio is imported (seconds each); the app is built once both are done.
    loading = threading.Thread(target=load_startup_model, args=(services,), name="startup-model")
    loading.start()
    from modules.ui.app import launch

    loading.join()
    return launch(services)


if __name__ == "__main__":
    sys.exit(main())
