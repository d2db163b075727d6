"""One API server for a test module: settings over throwaway folders with the project's presets, templates and
characters, a manager that loads its model once, and the server on a free loopback port, stopped at the end."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import ROOT
from modules.model_manager import Generation, ModelManager
from modules.services import Services
from modules.settings import Settings


def server_settings(model_dir: Path, folder: Path, **extra: Any) -> Settings:
    """Settings whose models are in `model_dir` and whose LoRAs and user data go to `folder`."""
    return Settings(model_dir=model_dir, lora_dir=folder / "loras", user_data_dir=folder,
                    preset_dir=ROOT / "presets", template_dir=ROOT / "instruction-templates",
                    character_dir=ROOT / "characters", **extra)


def loaded_manager(model_dir: Path, folder: Path, model: str, *, n_ctx: int, **options: Any) -> ModelManager:
    manager = ModelManager(model_dir, folder / "loras")
    manager.load(model, options={"n_ctx": n_ctx, **options})
    return manager


def recording_generations(manager: ModelManager) -> list[Generation]:
    """The Generations `manager.generate` hands out from now on, in order (the real generate, observed)."""
    generations: list[Generation] = []
    generate: Callable[..., Generation] = manager.generate

    def recording(*args: Any, **kwargs: Any) -> Generation:
        generation = generate(*args, **kwargs)
        generations.append(generation)
        return generation

    manager.generate = recording  # type: ignore[method-assign]
    return generations


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve a FastAPI app on a free port; its base URL."""
    from extensions.openai.server import serve_app

    server = serve_app(app, "127.0.0.1", 0)
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def serving_api(services: Services, params: Any = None) -> Iterator[str]:
    """Serve the API alone (extensions/openai) over `services`; its base URL."""
    from extensions.openai.server import create_app

    with serving(create_app(services, params)) as url:
        yield url


@contextmanager
def serving_extensions(services: Services) -> Iterator[str]:
    """Serve the app the settings' extensions set up, with every extension's routes, as webui.py does (their
    start hooks aside); its base URL."""
    from modules.extensions import start_extensions

    registry = start_extensions(services, serve=False)
    assert not registry.errors, registry.messages()
    with serving(registry.app) as url:
        yield url


def models_folder(folder: Path, files: dict[str, Path]) -> Path:
    """A models/ folder in `folder` whose entries are links to `files` (name -> file)."""
    models = folder / "models"
    models.mkdir()
    for name, target in files.items():
        (models / name).symlink_to(target)
    return models
