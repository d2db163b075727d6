"""Compare models (or types of one model: GGUF types, GPTQ and AWQ folders, full precision) on this machine: for
each, loaded in turn through the ModelManager with the loader it picks, its file size, the memory its process grew
by, load time, prompt and generation speed, perplexity on a held-out text and its greedy answers to a few fixed
prompts. One table; each run saved as JSON and CSV under user_data/comparisons/.

    python -m modules.compare MODEL [MODEL ...] [--prompts P [P ...]] [--text FILE] [--max-new-tokens N]

compare() is the API a UI panel calls (with a progress callback and a cancel event); the command line prints the
table. Speed is measured on the first request after the load (nothing cached): a prompt cut from the held-out
text, prompt tokens/s being its tokens over the time to the first token, generation tokens/s the rest.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modules.cli import ArgumentParser, parse_loader_options, report
from modules.errors import ConfigError, GenerationError, WorkbenchError
from modules.paths import atomic_write_text
from modules.quantize.job import Progress, ProgressCallback, Tracker, human_size

if TYPE_CHECKING:
    from modules.model_manager import ModelManager

DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in one short sentence.",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
)
DEFAULT_TEXT = Path("data/the-verdict.txt")
SPEED_PROMPT_TOKENS = 256
SPEED_NEW_TOKENS = 32


@dataclass
class Row:
    """One model's measurements. Sizes in bytes, times in seconds; rss_delta is how much the process's resident
    memory grew from before the load to after the measurements (weights paged in by then)."""

    model: str
    loader: str
    file_bytes: int
    rss_delta_bytes: int
    load_seconds: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    perplexity: float
    perplexity_tokens: int
    answers: list[str] = field(default_factory=list)


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def compare(models: list[str], *, model_dir: Path, text: str, prompts: tuple[str, ...] | list[str] = DEFAULT_PROMPTS,
            loader: str | None = None, loader_options: dict[str, Any] | None = None, max_new_tokens: int = 48,
            context_length: int = 512, stride: int = 256, max_tokens: int = 0, memory_budget: int = 0,
            progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> list[Row]:
    """Measure each of `models` (names in `model_dir`) in turn; see Row. `max_tokens` caps the perplexity text
    (0: all of it). `memory_budget` (bytes; 0: no limit) is what one model may take, as --memory-budget counts
    it: the web UI gives what its resident models leave; a model whose files need more is refused before any
    loads."""
    from modules.memory import release_memory
    from modules.model_manager import ModelManager

    if not models:
        raise ConfigError("Name at least one model to compare.")
    if not text.strip():
        raise ConfigError("The held-out text is empty.")
    # options go to the loaders that have them (as settings.yaml's do): one comparison may mix loaders
    manager = ModelManager(Path(model_dir), Path("loras"), loader_options=loader_options or {},
                           memory_budget=memory_budget)
    known: set[str] = set()
    for name in models:  # every name, size and option checked before the first load
        plan = manager.plan(name, loader)
        known |= set(plan.loader.Options.model_fields)
        if memory_budget and plan.size > memory_budget:
            raise ConfigError(f"{name} needs about {plan.size / 2**30:.2f} GiB, more than the "
                              f"{memory_budget / 2**30:.2f} GiB the memory budget leaves for a comparison.")
    unknown = sorted(set(loader_options or {}) - known)
    if unknown:
        raise ConfigError(f"No loader of these models takes the option(s) {', '.join(unknown)}.")
    _import_everything(manager, models, loader)
    stages = {f"{i}:{step}": weight for i in range(len(models))
              for step, weight in (("load", 1.0), ("speed", 1.0), ("answers", 1.0), ("perplexity", 2.0))}
    tracker = Tracker(stages, progress, cancel)
    rows = []
    try:
        for index, name in enumerate(models):
            rows.append(_measure(manager, index, name, text=text, prompts=list(prompts), loader=loader,
                                 max_new_tokens=max_new_tokens,
                                 context_length=context_length, stride=stride, max_tokens=max_tokens,
                                 tracker=tracker))
            manager.unload()
            release_memory()
    finally:
        manager.close()
        release_memory()
    return rows


def budget_beside(manager: ModelManager, budget: int) -> int:
    """What `budget` (--memory-budget, bytes; 0: none) leaves beside `manager`'s resident models for the model a
    comparison measures (0: no limit): the comparison loads its models beside them, one at a time."""
    if not budget:
        return 0
    left = budget - manager.pool.memory_used()
    if left <= 0:
        raise ConfigError(f"The loaded models take all of the memory budget ({budget / 2**30:.2f} GiB): unload one "
                          "to compare models.")
    return left


def _import_everything(manager: Any, models: list[str], loader: str | None) -> None:
    """Import what loading and measuring will import, before the first memory baseline, so that the first model's
    resident-memory growth is not charged with libraries every later model shares."""
    import importlib

    for module in ("modules.chat.request", "modules.training.perplexity"):
        importlib.import_module(module)
    from loaders.transformers_quant import library_output_to_stderr, quantized_checkpoint

    backends = {"llama.cpp": ("llama_cpp",), "transformers": ("torch", "transformers")}
    for name in models:
        plan = manager.plan(name, loader)
        for module in backends.get(plan.loader.name, ()):
            importlib.import_module(module)
        if plan.loader.name == "transformers" and quantized_checkpoint(plan.path) is not None:
            for module in ("gptqmodel", "optimum.gptq"):  # a GPTQ/AWQ folder's kernels
                try:
                    with library_output_to_stderr():
                        importlib.import_module(module)
                except ImportError:
                    pass  # its load says what to install


def _measure(manager: Any, index: int, name: str, *, text: str, prompts: list[str], loader: str | None,
             max_new_tokens: int, context_length: int, stride: int, max_tokens: int,
             tracker: Tracker) -> Row:
    from modules.generation_params import GenerationParams
    from modules.memory import release_memory
    from modules.training.perplexity import evaluate_perplexity

    def stage(step: str, fraction: float = 0.0) -> None:
        tracker.check()
        tracker.update(f"{index}:{step}", fraction, name)

    stage("load")
    release_memory()
    before = rss_bytes()
    loaded = manager.load(name, loader)
    stage("speed")
    greedy = GenerationParams(do_sample=False, max_new_tokens=SPEED_NEW_TOKENS, ban_eos_token=True, seed=1)
    ids = manager.encode(text, add_bos=True)
    # a few tokens first on another part of the text: the weights' first page faults and kernel set-up belong
    # to loading, not to the speed
    manager.complete(ids[SPEED_PROMPT_TOKENS:SPEED_PROMPT_TOKENS + 32] or ids[:8],
                     greedy.model_copy(update={"max_new_tokens": 2}), add_bos=False)
    timing = manager.complete(ids[:SPEED_PROMPT_TOKENS], greedy, add_bos=False)
    stats = timing.stats
    first = stats.time_to_first_token_s or 0.0
    prompt_speed = stats.prompt_tokens / first if first > 0 else 0.0
    rest = stats.seconds - first
    generation_speed = (stats.completion_tokens - 1) / rest if rest > 0 and stats.completion_tokens > 1 else 0.0
    answers = []
    for number, prompt in enumerate(prompts):
        stage("answers", number / max(len(prompts), 1))
        answers.append(_chat_answer(manager, prompt, max_new_tokens))
    stage("perplexity")
    try:
        result = evaluate_perplexity(manager, text, source="held-out text", context_length=context_length,
                                     stride=stride, max_tokens=max_tokens, cancel=tracker.cancel,
                                     progress=lambda f: tracker.update(f"{index}:perplexity", f, name))
    except GenerationError:
        tracker.check()  # a cancelled evaluation is a cancelled comparison
        raise
    grown = rss_bytes() - before
    tracker.update(f"{index}:perplexity", 1.0, name)
    return Row(model=name, loader=loaded.info.loader, file_bytes=model_bytes(manager.model_path(name)),
               rss_delta_bytes=max(grown, 0), load_seconds=round(loaded.seconds, 3),
               prompt_tokens_per_s=round(prompt_speed, 1), generation_tokens_per_s=round(generation_speed, 1),
               perplexity=result.perplexity, perplexity_tokens=result.tokens, answers=answers)


def _chat_answer(manager: Any, prompt: str, max_new_tokens: int) -> str:
    """The greedy reply to `prompt` as a user message, through the one chat path (the model's template)."""
    from modules.chat.request import prepare_chat
    from modules.generate import chat_request
    from modules.generation_params import GenerationParams
    from modules.services import Services
    from modules.settings import Settings

    params = GenerationParams(do_sample=False, max_new_tokens=max_new_tokens, seed=1)
    services = Services(settings=Settings(model_dir=manager.model_dir), manager=manager)
    prepared = prepare_chat(services, chat_request(prompt, params))
    generation = prepared.generate(manager, cut_to_fit=False)
    for _ in generation:
        pass
    return generation.text.strip()


# --- saving and showing ----------------------------------------------------------------------------------------

CSV_COLUMNS = ("model", "loader", "file_bytes", "rss_delta_bytes", "load_seconds", "prompt_tokens_per_s",
               "generation_tokens_per_s", "perplexity", "perplexity_tokens")


def save_run(rows: list[Row], folder: Path, *, prompts: list[str], text_source: str,
             stamp: str | None = None) -> tuple[Path, Path]:
    """Write the run as `<stamp>.json` (everything, with the prompts) and `<stamp>.csv` (one line per model, the
    answers as answer_1..n) in `folder`, each atomically."""
    stamp = stamp or time.strftime("%Y-%m-%dT%H-%M-%S")
    document = {"time": round(time.time()), "text_source": text_source, "prompts": prompts,
                "rows": [asdict(row) for row in rows]}
    json_path = folder / f"{stamp}.json"
    csv_path = folder / f"{stamp}.csv"
    atomic_write_text(json_path, json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*CSV_COLUMNS, *(f"answer_{i + 1}" for i in range(len(prompts)))])
    for row in rows:
        values = asdict(row)
        writer.writerow([*(values[c] for c in CSV_COLUMNS), *row.answers])
    atomic_write_text(csv_path, buffer.getvalue())
    return json_path, csv_path


def list_runs(folder: Path) -> list[str]:
    """The saved runs in `folder` (their JSON files' stems), newest first."""
    if not folder.is_dir():
        return []
    return sorted((p.stem for p in folder.glob("*.json") if not p.name.startswith(".")), reverse=True)


def load_run(folder: Path, stamp: str) -> tuple[list[Row], list[str], str]:
    """A run save_run wrote: (rows, prompts, text source). A missing or damaged file is a ConfigError."""
    from modules.paths import resolve_inside

    path = resolve_inside(folder, f"{stamp}.json", what="saved comparison", must_exist=True)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        rows = [Row(**row) for row in document["rows"]]
        return rows, list(document.get("prompts", [])), str(document.get("text_source", ""))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path.name} is not a readable saved comparison: {exc}") from None


def format_table(rows: list[Row], prompts: list[str]) -> str:
    """The measurements as an aligned text table, then each prompt with every model's answer."""
    header = ("model", "loader", "file", "RSS +", "load s", "prompt t/s", "gen t/s", "perplexity")
    lines = [(r.model, r.loader, human_size(r.file_bytes), human_size(r.rss_delta_bytes), f"{r.load_seconds:.2f}",
              f"{r.prompt_tokens_per_s:.1f}", f"{r.generation_tokens_per_s:.1f}", f"{r.perplexity:.3f}")
             for r in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    out = [" | ".join(cell.ljust(w) for cell, w in zip(header, widths)),
           "-+-".join("-" * w for w in widths)]
    out += [" | ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    for number, prompt in enumerate(prompts):
        out += ["", f"Q{number + 1}: {prompt}"]
        out += [f"  {r.model}: {' '.join(r.answers[number].split())}" for r in rows]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m modules.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="MODEL", help="Models in --model-dir (.gguf files or folders).")
    parser.add_argument("--prompts", nargs="+", metavar="PROMPT", help="Prompts to answer greedily (default: three "
                                                                        "fixed ones).")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="Held-out text for perplexity and the "
                                                                       "speed prompt (default: %(default)s).")
    parser.add_argument("--max-tokens", type=int, default=0, help="Score at most this many tokens of the text "
                                                                 "(default: all).")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="Tokens per answer (default 48).")
    parser.add_argument("--loader", help="Force a loader (default: picked per model).")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="Loader option for every model, e.g. --option n_ctx=2048 (repeatable).")
    parser.add_argument("--model-dir", type=Path, default=Path("models"), help="Folder of models.")
    parser.add_argument("--user-data-dir", type=Path, default=Path("user_data"),
                        help="The run is saved in its comparisons/ folder.")
    return parser.parse_args(argv)


def _print_stage() -> ProgressCallback:
    """Progress on stderr: one line as each model enters each step."""
    shown: set[str] = set()

    def show(progress: Progress) -> None:
        if progress.stage not in shown:
            shown.add(progress.stage)
            print(f"{progress.detail}: {progress.stage.split(':')[1]} ({progress.fraction:.0%} of the run)",
                  file=sys.stderr, flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.max_new_tokens < 1 or args.max_tokens < 0:
            raise ConfigError("--max-new-tokens must be at least 1 and --max-tokens not negative.")
        try:
            text = args.text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read the held-out text {args.text}: {exc}") from None
        prompts = list(args.prompts or DEFAULT_PROMPTS)
        rows = compare(args.models, model_dir=args.model_dir, text=text, prompts=prompts, loader=args.loader,
                       loader_options=parse_loader_options(args.option), max_new_tokens=args.max_new_tokens,
                       max_tokens=args.max_tokens, progress=_print_stage())
        json_path, csv_path = save_run(rows, args.user_data_dir / "comparisons", prompts=prompts,
                                       text_source=str(args.text))
    except WorkbenchError as exc:
        return report(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(format_table(rows, prompts))
    print(f"\nsaved {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
