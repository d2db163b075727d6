"""Command line for scripts: print a completion to stdout as it streams; errors go to stderr with exit code 2.

    python -m modules.generate --model NAME [--loader L] [--preset P] [--max-new-tokens N] [--seed S] [--chat]
                               [--json-schema FILE] --prompt TEXT
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from modules.cli import ArgumentParser, parse_loader_options, report
from modules.errors import ConfigError, WorkbenchError

if TYPE_CHECKING:
    from modules.chat.request import ChatRequest
    from modules.generation_params import GenerationParams


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m modules.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Model name in --model-dir (a .gguf file or a folder).")
    parser.add_argument("--loader", help="Force a loader (llama.cpp, transformers).")
    parser.add_argument("--model-dir", default="models", help="Folder of models.")
    parser.add_argument("--preset-dir", default="presets", help="Folder of presets.")
    parser.add_argument("--preset", help="Preset name (default: none, the neutral defaults).")
    parser.add_argument("--max-new-tokens", type=int, help="Most tokens to generate.")
    parser.add_argument("--seed", type=int, help="Random seed.")
    parser.add_argument("--temperature", type=float, help="Sampling temperature (0 = greedy).")
    parser.add_argument("--stop", action="append", default=None, help="Stop string (repeatable).")
    parser.add_argument("--chat", action="store_true", help="Send the prompt as a user message through the chat path "
                                                           "the web UI and the API take (the model's chat template "
                                                           "and its stop strings).")
    parser.add_argument("--system", help="System message, with --chat.")
    parser.add_argument("--json-schema", type=Path, help="File with a JSON schema the output must follow.")
    parser.add_argument("--grammar", type=Path, help="File with a GBNF grammar the output must follow.")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="Loader option, e.g. --option n_ctx=2048 (repeatable; values parsed as JSON).")
    parser.add_argument("--prompt", required=True, help="The prompt text ('-' reads standard input).")
    return parser.parse_args(argv)


def chat_request(prompt: str, params: GenerationParams, system: str | None = None) -> ChatRequest:
    """--chat: the prompt as the user's message (after a system message) in instruct mode with the model's own
    template, refused when it does not fit the context rather than cut."""
    from modules.chat.request import ChatRequest
    from modules.settings import ChatSettings

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return ChatRequest(messages=messages, chat=ChatSettings(), params=params, fit="refuse", new_user_message=True,
                       source="cli")


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from modules.chat.request import prepare_chat
    from modules.generation_params import GenerationParams
    from modules.model_manager import ModelManager
    from modules.presets import load_preset, params_from_mapping
    from modules.services import Services
    from modules.settings import Settings

    params = load_preset(Path(args.preset_dir), args.preset) if args.preset else GenerationParams()
    updates: dict[str, object] = {}
    if args.max_new_tokens is not None:
        updates["max_new_tokens"] = args.max_new_tokens
    if args.seed is not None:
        updates["seed"] = args.seed
    if args.temperature is not None:
        updates["temperature"] = args.temperature
    if args.stop:
        updates["stop"] = args.stop
    if args.json_schema:
        try:
            updates["json_schema"] = json.loads(args.json_schema.read_text())
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
            raise ConfigError(f"Cannot read the JSON schema {args.json_schema}: {exc}") from None
    if args.grammar:
        try:
            updates["grammar_string"] = args.grammar.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read the grammar {args.grammar}: {exc}") from None
    params = params_from_mapping({**params.model_dump(), **updates}, "command line")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    manager = ModelManager(Path(args.model_dir), Path("loras"))
    manager.load(args.model, args.loader, parse_loader_options(args.option))
    if args.chat:
        services = Services(settings=Settings(model_dir=Path(args.model_dir), preset_dir=Path(args.preset_dir)),
                            manager=manager)
        prepared = prepare_chat(services, chat_request(prompt, params, args.system))
        for warning in prepared.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        generation = prepared.generate(manager, cut_to_fit=False)
    else:
        generation = manager.generate(prompt, params)
    for warning in generation.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for chunk in generation:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    manager.unload()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    try:
        return run(argv)
    except WorkbenchError as exc:
        return report(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
