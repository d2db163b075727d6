"""Start the workbench: flags + settings.yaml -> Settings -> services -> the Gradio app (and the API)."""
from __future__ import annotations

import logging
import sys


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
    # Imports first, then the model, one after the other: loading the model in a thread while the UI was imported
    # made two threads import transformers at once, and its lazy modules then came back partially initialized
    # (ImportError at start-up). Overlapping them saved under half a second for a GGUF model.
    from modules.ui.app import launch

    load_startup_model(services)
    return launch(services)


if __name__ == "__main__":
    sys.exit(main())
