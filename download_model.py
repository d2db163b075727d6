"""Fetch a model from the Hugging Face hub into models/ (or place the starter model).

    python download_model.py ORG/NAME [--revision REV] [--include PATTERN ...] [--model-dir models]
    python download_model.py starter

Downloads resume where they stopped and show a progress bar (huggingface_hub does both). A token for gated or
private repositories is read from the HF_TOKEN environment variable (or the hub's own login).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from modules.cli import ArgumentParser, report
from modules.errors import ConfigError, WorkbenchError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class DownloadPlan:
    repo_id: str
    target: Path
    revision: str | None = None
    include: list[str] = field(default_factory=list)
    token: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", help="Hub repository id ORG/NAME (optionally ORG/NAME:BRANCH), or 'starter'.")
    parser.add_argument("--revision", help="Branch, tag or commit.")
    parser.add_argument("--include", nargs="+", default=[], metavar="PATTERN",
                        help="Only files matching these glob patterns, e.g. '*Q4_K_M.gguf' for one GGUF file.")
    parser.add_argument("--model-dir", type=Path, default=Path("models"), help="Where models live.")
    return parser.parse_args(argv)


def plan(repo: str, *, model_dir: Path, revision: str | None = None, include: list[str] | None = None,
         environ: dict[str, str] | None = None) -> DownloadPlan:
    """Validate the request and decide where it lands, without touching the network."""
    environ = dict(os.environ) if environ is None else environ
    repo = repo.strip()
    if repo.startswith("https://huggingface.co/"):
        repo = repo.removeprefix("https://huggingface.co/").strip("/")
    if ":" in repo and revision is None:
        repo, revision = repo.split(":", 1)
    if not _REPO_ID.match(repo) or ".." in repo:
        raise WorkbenchError(f"{repo!r} is not a hub repository id of the form ORG/NAME.")
    folder = repo.replace("/", "_")
    if revision and revision != "main":
        folder += f"_{re.sub(r'[^A-Za-z0-9._-]', '_', revision)}"
    token = environ.get("HF_TOKEN") or environ.get("HUGGING_FACE_HUB_TOKEN") or None
    return DownloadPlan(repo_id=repo, target=model_dir / folder, revision=revision, include=list(include or []),
                        token=token)


def download(request: DownloadPlan) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        snapshot_download(repo_id=request.repo_id, revision=request.revision, local_dir=request.target,
                          allow_patterns=request.include or None, token=request.token)
    except RepositoryNotFoundError:
        raise WorkbenchError(f"No repository {request.repo_id} on the hub (or it is private: set HF_TOKEN).") from None
    except RevisionNotFoundError:
        raise WorkbenchError(f"{request.repo_id} has no revision {request.revision!r}.") from None
    except (HfHubHTTPError, OSError) as exc:
        raise WorkbenchError(f"Downloading {request.repo_id} failed: {exc}") from None
    files = [p for p in request.target.rglob("*") if p.is_file() and ".cache" not in p.parts]
    if not files:
        raise WorkbenchError(f"No file of {request.repo_id} matched {request.include}.")
    return request.target


def make_model_dir(model_dir: Path) -> None:
    """Create the model folder now, so a bad --model-dir is reported before any download starts."""
    if model_dir.exists() and not model_dir.is_dir():
        raise ConfigError(f"Cannot use {model_dir} as the model folder: it is a file.")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Cannot use {model_dir} as the model folder: {exc.strerror}.") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        make_model_dir(args.model_dir)
        if args.repo == "starter":
            from modules.starter import ensure_starter

            for path in ensure_starter(args.model_dir):
                print(f"ready: {path}")
            return 0
        target = download(plan(args.repo, model_dir=args.model_dir, revision=args.revision, include=args.include))
        print(f"downloaded to {target}")
        return 0
    except WorkbenchError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
