"""What batching buys the Transformers loader: the cost of one decode step of B rows against one row, and the
aggregate tokens/s of N concurrent streams against one stream, in the same process.

    python bench/transformers_batching.py [--dtype bfloat16] [--tokens 64] [--rounds 3] [--library-cb]

1. Step cost: one decode step of 1, 4, 8 and 16 rows (a ~40-token chat prompt each, greedy), as a bare
   Transformers forward over a DynamicCache ("bare") and as our batch decoder's step (forward, per-row processors
   and picks, token events: "ours"), each against a 1-row batch of the same kind stepped in turn with it (the
   median of --steps per-pair ratios after 3 warm-up pairs), so the machine's drift touches both alike. All model
   work runs off the main thread (modules/cpu_threads.py), as the server's does.
2. Streams: N = 1, 4, 8, 16 concurrent requests through ModelManager.generate (the model loaded with parallel 16,
   so the engine batches them), --tokens each (EOS banned), round by round; aggregate generated tokens/s over the
   wall time, relative to one stream, and the median time to first token.
3. With --library-cb: Transformers' own continuous batching (model.generate_batch) on 8 of the same prompts, greedy,
   next to one plain stream, for the record of why the loader has its own loop.

The last line is one JSON object: {"device", "dtype", "step_ratio": {"bare": {B: x}, "ours": {B: x}},
"agg_ratio": {N: x}, "agg_tok_s": {N: x}, "ttft_s": {N: x}, ...}.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from needs import need_packages  # noqa: E402

from modules.cli import ArgumentParser  # noqa: E402

need_packages("torch", "transformers", requirements="requirements.txt")

import torch  # noqa: E402

from loaders.batching import SequenceRequest  # noqa: E402
from loaders.transformers_batch import TransformersBatch  # noqa: E402
from loaders.transformers_loader import input_device  # noqa: E402
from modules.cpu_threads import in_short_lived_thread  # noqa: E402
from modules.generation_params import GenerationParams  # noqa: E402
from modules.model_manager import ModelManager  # noqa: E402
from modules.starter import STARTER_HF_DIR  # noqa: E402

from batching_measures import ROWS, alternate, prompts, stream_rounds  # noqa: E402

class BareRows:
    """`rows` copies of one prompt decoded by bare forwards over a DynamicCache (greedy)."""

    def __init__(self, model, ids: list[int], rows: int):
        from transformers import DynamicCache

        self.model = model
        with torch.inference_mode():
            batch = torch.tensor([ids] * rows, device=input_device(model))
            out = model(input_ids=batch, past_key_values=DynamicCache(config=model.config), use_cache=True,
                        logits_to_keep=1)
        self.cache, self.token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self) -> None:
        with torch.inference_mode():
            out = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            self.cache, self.token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            self.token.cpu()


class OurRows:
    """`rows` requests generating in one of our batch decoders (their prompts already read)."""

    def __init__(self, loaded, all_ids: list[list[int]], rows: int):
        self.decoder = TransformersBatch(loaded, max(ROWS))
        params = GenerationParams(do_sample=False, max_new_tokens=10_000, ban_eos_token=True)
        for key in range(rows):
            self.decoder.add(key, SequenceRequest(all_ids[key % len(all_ids)], params))
        while self.decoder._reading:
            self.decoder.step()

    def step(self) -> None:
        self.decoder.step()


def step_ratio(one, many, steps: int) -> tuple[float, float, float]:
    """(median seconds of a 1-row step, of a many-row step, median of their per-pair ratios)."""
    return alternate(one.step, many.step, steps)


def library_cb(manager: ModelManager, all_ids: list[list[int]], tokens: int) -> dict[str, float]:
    """Transformers' generate_batch on 8 prompts next to one plain greedy stream of the same model."""
    from transformers import DynamicCache, GenerationConfig

    with manager.exclusive() as loaded:
        model = loaded.model
        config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        started = time.perf_counter()
        outputs = model.generate_batch(all_ids[:8], generation_config=config, warmup=False)
        seconds = time.perf_counter() - started
        made = sum(len(o.generated_tokens) for o in outputs.values())
        device = input_device(model)
        started = time.perf_counter()
        with torch.inference_mode():
            cache, token = DynamicCache(config=model.config), torch.tensor([all_ids[0]], device=device)
            for _ in range(tokens):
                out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            token.cpu()
        single = tokens / (time.perf_counter() - started)
    return {"library_cb_8_tok_s": round(made / seconds, 2), "plain_single_tok_s": round(single, 2),
            "library_cb_8_vs_single": round(made / seconds / single, 2)}


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the stream runs (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per step-cost figure (default 20)")
    parser.add_argument("--library-cb", action="store_true", help="also time Transformers' generate_batch")
    args = parser.parse_args()

    manager = ModelManager(ROOT / "models", ROOT / "loras")
    manager.load(STARTER_HF_DIR, "transformers", {"dtype": args.dtype, "parallel": max(ROWS)})
    all_ids = prompts(manager)
    result: dict = {"device": str(input_device(manager.require_model().model)), "dtype": args.dtype,
                    "prompt_tokens": statistics.median(len(i) for i in all_ids), "tokens": args.tokens}

    def measure() -> dict:
        figures: dict = {"step_ms": {"bare": {}, "ours": {}}, "step_ratio": {"bare": {1: 1.0}, "ours": {1: 1.0}}}
        with manager.exclusive() as loaded:
            for kind, make in (("bare", lambda rows: BareRows(loaded.model, all_ids[0], rows)),
                               ("ours", lambda rows: OurRows(loaded, all_ids, rows))):
                for rows in ROWS[1:]:
                    one_s, many_s, ratio = step_ratio(make(1), make(rows), args.steps)
                    figures["step_ms"][kind].setdefault(1, []).append(round(one_s * 1000, 2))
                    figures["step_ms"][kind][rows] = round(many_s * 1000, 2)
                    figures["step_ratio"][kind][rows] = round(ratio, 2)
        for kind in ("bare", "ours"):
            figures["step_ms"][kind][1] = statistics.median(figures["step_ms"][kind][1])
        return figures

    result.update(in_short_lived_thread(measure))
    print("step ratio (bare / ours):", {r: (result["step_ratio"]["bare"][r], result["step_ratio"]["ours"][r])
                                        for r in ROWS}, flush=True)

    result.update(stream_rounds(manager, all_ids, args.rounds, args.tokens))
    if args.library_cb:
        result.update(in_short_lived_thread(lambda: library_cb(manager, all_ids, args.tokens)))
    manager.unload()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
