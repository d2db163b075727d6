"""What continuous batching costs and gives in the llama.cpp loader, on the starter GGUF (Q4_1):

    python bench/llama_cpp_batching.py [--steps 20] [--tokens 64] [--rounds 3]

1. Step cost: one decode step of 1, 4, 8 and 16 generating sequences through our batch decoder
   (loaders/llama_cpp_batch.py: one llama_decode, per-sequence sampler chains, token events), each against a
   1-sequence decoder stepped in turn with it (the median of --steps per-pair ratios after 3 warm-up pairs), so the
   machine's drift touches both alike. The ratio is the ceiling of what batching can give: N sequences for the
   cost of `ratio` steps.
2. Streams: N = 1, 4, 8, 16 concurrent requests through ModelManager.generate (the model loaded with parallel 16),
   --tokens each (EOS banned), round by round; aggregate generated tokens/s over the wall time, relative to one
   stream, and the median time to first token.
The last line is one JSON object.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from needs import need_packages  # noqa: E402

from modules.cli import ArgumentParser  # noqa: E402

need_packages("llama_cpp", requirements="requirements.txt")

from loaders.batching import SequenceRequest  # noqa: E402
from loaders.llama_cpp_batch import LlamaCppBatch  # noqa: E402
from modules.generation_params import GenerationParams  # noqa: E402
from modules.model_manager import ModelManager  # noqa: E402
from modules.starter import STARTER_GGUF  # noqa: E402

from batching_measures import ROWS, alternate, prompts, stream_rounds  # noqa: E402

LONG = GenerationParams(do_sample=False, max_new_tokens=100_000, ban_eos_token=True)


def step_ratio(model, all_ids: list[list[int]], rows: int, steps: int) -> tuple[float, float, float]:
    """(median seconds of a 1-sequence step, of a `rows`-sequence step, median per-pair ratio). The two groups
    share one decoder (one context) in turn: the lone sequence is stepped, then the group."""
    taken = object()  # marks a slot (a sequence id of the context) as the other decoder's
    one, many = LlamaCppBatch(model), None
    try:
        for slot in one._slots[1:]:
            slot.sequence = taken
        one.add(0, SequenceRequest(all_ids[0], LONG))
        while not one._sequences[0].generating:
            one.step()
        many = LlamaCppBatch(model)  # the same context: its sequence ids 1..rows hold the group
        many._slots[0].sequence = taken
        for key in range(1, rows + 1):
            many.add(key, SequenceRequest(all_ids[key % len(all_ids)], LONG))
        while not all(s.generating for s in many._sequences.values()):
            many.step()
        return alternate(one.step, many.step, steps)
    finally:
        for decoder in (one, many):
            if decoder is not None:
                decoder.release()
                for slot in decoder._slots:
                    if slot.sequence is taken:
                        slot.sequence = None
        llama_cpp_clear(model)


def llama_cpp_clear(model) -> None:
    """Empty the context's KV (every sequence), so the next measurement starts from a clean cache."""
    import llama_cpp

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(model._llama._ctx.ctx), True)


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the stream runs (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per step-cost figure (default 20)")
    args = parser.parse_args()

    manager = ModelManager(ROOT / "models", ROOT / "loras")
    manager.load(STARTER_GGUF, "llama.cpp", {"parallel": max(ROWS) + 1, "n_ctx": 8192})
    all_ids = prompts(manager)
    result: dict = {"model": STARTER_GGUF, "prompt_tokens": statistics.median(len(i) for i in all_ids),
                    "tokens": args.tokens, "step_ms": {}, "step_ratio": {1: 1.0}}
    with manager.exclusive() as model:
        ones = []
        for rows in ROWS[1:]:
            one_s, many_s, ratio = step_ratio(model, all_ids, rows, args.steps)
            ones.append(one_s)
            result["step_ms"][rows] = round(many_s * 1000, 2)
            result["step_ratio"][rows] = round(ratio, 2)
        result["step_ms"][1] = round(statistics.median(ones) * 1000, 2)
        model._batch = None  # the engine makes its own decoder again
    print("step ratio:", result["step_ratio"], flush=True)

    result.update(stream_rounds(manager, all_ids, args.rounds, args.tokens))
    manager.unload()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
