"""Command line: make a quantized model in models/ from one that is there. Bad input: one line, exit status 2.

    python -m modules.quantize gguf MODEL --type Q4_K_M [--output NAME] [--imatrix CALIBRATION_TEXT] [--overwrite]
    python -m modules.quantize gptq MODEL --bits 4 --group-size 128 [--act-order] [--output NAME] [--overwrite]
    python -m modules.quantize awq MODEL --bits 4 [--group-size 128] [--output NAME] [--overwrite]
      both: [--calibration FILE [FILE ...]] [--samples N] [--seq-len TOKENS]

Each format is one subcommand: a function that adds its arguments and one that runs it, in FORMATS below.
"""
from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from modules.cli import ArgumentParser, report
from modules.errors import ConfigError, WorkbenchError
from modules.quantize.job import Progress, human_size, output_path


def _gguf_arguments(parser: argparse.ArgumentParser) -> None:
    from modules.quantize.llama_tools import GGUF_TYPES

    parser.add_argument("--type", required=True, metavar="TYPE",
                        help=f"llama.cpp type: {', '.join(GGUF_TYPES)} (case does not matter).")
    parser.add_argument("--output", help="File name in --model-dir (default: MODEL.TYPE.gguf; .gguf is added "
                                         "when missing).")
    parser.add_argument("--imatrix", type=Path, metavar="CALIBRATION_TEXT",
                        help="Text file to collect an importance matrix on (llama.cpp's imatrix); it guides "
                             "which weights keep more precision.")
    parser.add_argument("--imatrix-chunk", type=int, default=512, metavar="TOKENS",
                        help="Tokens per decoded chunk of the calibration text (default 512).")
    parser.add_argument("--threads", type=int, default=0, help="Threads (default: llama.cpp's choice).")


def _run_gguf(args: argparse.Namespace, models: Path, progress: Callable[[Progress], None],
              cancel: threading.Event) -> Path:
    from modules.paths import resolve_inside
    from modules.quantize.gguf import gguf_name, make_gguf
    from modules.quantize.llama_tools import gguf_type

    kind = gguf_type(args.type)
    source = resolve_inside(models, args.model, what="model", must_exist=True)
    target = output_path(models, args.output or gguf_name(source.name, kind.name), ".gguf", overwrite=args.overwrite)
    calibration = None
    if args.imatrix is not None:
        try:
            calibration = args.imatrix.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read the calibration text {args.imatrix}: {exc}") from None
    if args.imatrix_chunk < 16:
        raise ConfigError("--imatrix-chunk must be at least 16 tokens.")
    return make_gguf(source, target, kind.name, calibration=calibration, overwrite=args.overwrite,
                     threads=args.threads, imatrix_chunk=args.imatrix_chunk, progress=progress, cancel=cancel)


def _calibration_arguments(parser: argparse.ArgumentParser) -> None:
    from modules.quantize.gptq import DEFAULT_CALIBRATION

    parser.add_argument("--output", help="Folder name in --model-dir (default: MODEL-METHOD-Nbit-gSIZE).")
    parser.add_argument("--calibration", type=Path, nargs="+", metavar="FILE",
                        help="Calibration data: .txt raw text, or .json/.jsonl records (instruction/input/output, "
                             "messages or text). Default: " + " and ".join(f"data/{p.name}" for p in
                                                                          DEFAULT_CALIBRATION) + ".")
    parser.add_argument("--samples", type=int, default=128, help="Calibration samples (default 128).")
    parser.add_argument("--seq-len", type=int, default=512, metavar="TOKENS",
                        help="Most tokens per calibration sample (default 512).")


def _gptq_arguments(parser: argparse.ArgumentParser) -> None:
    from modules.quantize.gptq import GPTQ_BITS, GROUP_SIZES

    parser.add_argument("--bits", type=int, default=4, choices=GPTQ_BITS)
    parser.add_argument("--group-size", type=int, default=128, choices=GROUP_SIZES, metavar="SIZE",
                        help="Weights per scale: 32 keeps more precision, 1024 less; -1 one per row (default 128).")
    parser.add_argument("--act-order", action="store_true",
                        help="desc_act: quantize the columns with the largest activations first.")
    _calibration_arguments(parser)


def _awq_arguments(parser: argparse.ArgumentParser) -> None:
    from modules.quantize.gptq import AWQ_BITS, AWQ_GROUP_SIZES

    parser.add_argument("--bits", type=int, default=4, choices=AWQ_BITS)
    parser.add_argument("--group-size", type=int, choices=AWQ_GROUP_SIZES, metavar="SIZE",
                        help="Weights per scale, 16 to 128; every layer's input width must be a multiple of it "
                             "(default: 128, or the largest of 64/32/16 that fits the model).")
    _calibration_arguments(parser)


def _run_quantized(method: str) -> Callable[..., Path]:
    def run(args: argparse.Namespace, models: Path, progress: Callable[[Progress], None],
            cancel: threading.Event) -> Path:
        from modules.quantize.gptq import DEFAULT_CALIBRATION, make_quantized, plan_job

        source, target, spec = plan_job(models, args.model, method=method, bits=args.bits,
                                        group_size=args.group_size, desc_act=getattr(args, "act_order", False),
                                        samples=args.samples, seq_len=args.seq_len, output=args.output,
                                        overwrite=args.overwrite)
        return make_quantized(source, target, spec, calibration=args.calibration or DEFAULT_CALIBRATION,
                              overwrite=args.overwrite, progress=progress, cancel=cancel)

    return run


#: subcommand -> (help, add its arguments, run it and return the file or folder written in models/)
FORMATS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[..., Path]]] = {
    "gguf": ("GGUF through llama.cpp's converter and quantizer", _gguf_arguments, _run_gguf),
    "gptq": ("GPTQ through GPTQModel, calibrated on text", _gptq_arguments, _run_quantized("gptq")),
    "awq": ("AWQ through GPTQModel, calibrated on text", _awq_arguments, _run_quantized("awq")),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m modules.quantize", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="format", required=True, metavar="FORMAT",
                                     parser_class=ArgumentParser)
    for name, (summary, add_arguments, _) in FORMATS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.add_argument("model", metavar="MODEL", help="A model in --model-dir (a full-precision Transformers "
                                                        "folder, or for gguf also an F16/BF16/F32 .gguf file).")
        add_arguments(sub)
        sub.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
        sub.add_argument("--model-dir", type=Path, default=Path("models"), help="Folder of models.")
    return parser.parse_args(argv)


class _Printer:
    """Progress on stderr: a line when the stage changes or another tenth is done."""

    def __init__(self) -> None:
        self.shown: tuple[str, int] | None = None

    def __call__(self, progress: Progress) -> None:
        key = (progress.stage, int(progress.fraction * 10))
        if key != self.shown:
            self.shown = key
            eta = f", about {progress.eta:.0f} s left" if progress.eta is not None else ""
            print(f"{progress.stage}: {progress.fraction:.0%} done after {progress.elapsed:.0f} s{eta}",
                  file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        written = FORMATS[args.format][2](args, args.model_dir, _Printer(), threading.Event())
    except WorkbenchError as exc:
        return report(exc)
    except KeyboardInterrupt:  # the child process is killed and partial files removed on the way out
        print("interrupted", file=sys.stderr)
        return 130
    size = sum(f.stat().st_size for f in written.rglob("*")) if written.is_dir() else written.stat().st_size
    print(f"wrote {written} ({human_size(size)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
