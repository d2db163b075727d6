"""What batching buys the Transformers loader: the cost of one decode step of B rows against one row, and the
aggregate tokens/s of N concurrent streams against one stream, in the same process.

    python bench/transformers_batching.py [--dtype bfloat16] [--tokens 64] [--rounds 3] [--library-cb]

1. Step cost: one decode step of 1, 4, 8 and 16 rows (a ~40-token chat prompt each, greedy), as a bare
   Transformers forward over a DynamicCache ("bare") and as our batch decoder's step (forward, per-row processors
   and picks, token events: "ours"), each relative to its own 1-row step; per round the median of --steps steps
   after 3 warm-up ones, bare and ours alternating, then the median over the rounds. All model work runs off the
   main thread (modules/cpu_threads.py), as the server's does.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules.cli import ArgumentParser  # noqa: E402
from needs import need_packages  # noqa: E402

need_packages("torch", "transformers", requirements="requirements.txt")

import torch  # noqa: E402

from loaders.batching import SequenceRequest  # noqa: E402
from loaders.transformers_batch import TransformersBatch  # noqa: E402
from loaders.transformers_loader import input_device  # noqa: E402
from modules.chat.templates import render_chat  # noqa: E402
from modules.cpu_threads import in_short_lived_thread  # noqa: E402
from modules.generation_params import GenerationParams  # noqa: E402
from modules.model_manager import ModelManager  # noqa: E402
from modules.starter import STARTER_HF_DIR  # noqa: E402

ROWS = (1, 4, 8, 16)
TOPICS = ["a lighthouse", "a fox", "the sea", "a city at night", "a clock", "a garden", "a train", "the moon",
          "a library", "a storm", "a violin", "a desert", "a river", "a mountain", "a market", "a snowfall"]


def prompts(manager: ModelManager) -> list[list[int]]:
    model = manager.require_model()
    return [model.encode(render_chat(model.chat_template, [{"role": "user", "content": f"Write a story about {t}."}],
                                     add_generation_prompt=True)) for t in TOPICS]


def bare_step(model, ids: list[int], rows: int, steps: int) -> float:
    """Median seconds of one decode forward of `rows` rows (the same prompt each) over a DynamicCache."""
    from transformers import DynamicCache

    device = input_device(model)
    batch = torch.tensor([ids] * rows, device=device)
    times = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=batch, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(steps + 3):
            started = time.perf_counter()
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            token.cpu()
            if step >= 3:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def our_step(loaded, all_ids: list[list[int]], rows: int, steps: int) -> float:
    """Median seconds of one step of our batch decoder with `rows` generating rows."""
    decoder = TransformersBatch(loaded, max(ROWS))
    params = GenerationParams(do_sample=False, max_new_tokens=10_000, ban_eos_token=True)
    for key in range(rows):
        decoder.add(key, SequenceRequest(all_ids[key % len(all_ids)], params))
    while decoder._reading:  # read every prompt first
        decoder.step()
    times = []
    for step in range(steps + 3):
        started = time.perf_counter()
        decoder.step()
        if step >= 3:
            times.append(time.perf_counter() - started)
    decoder.close()
    return statistics.median(times)


def streams(manager: ModelManager, all_ids: list[list[int]], count: int, tokens: int) -> tuple[float, float, int]:
    """(aggregate tokens/s, median time to first token, tokens) of `count` concurrent requests."""
    params = GenerationParams(do_sample=False, max_new_tokens=tokens, ban_eos_token=True)
    firsts: list[float] = []
    totals = [0] * count

    def run(index: int, started: float) -> None:
        for chunk in manager.generate(all_ids[index % len(all_ids)], params):
            if chunk.tokens and totals[index] == 0:
                firsts.append(time.perf_counter() - started)
            totals[index] += len(chunk.tokens)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i, started)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return sum(totals) / seconds, statistics.median(firsts), sum(totals)


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

    timed: dict[str, dict[int, list[float]]] = {"bare": {r: [] for r in ROWS}, "ours": {r: [] for r in ROWS}}
    with manager.exclusive() as loaded:
        for _ in range(args.rounds):
            for rows in ROWS:
                timed["bare"][rows].append(in_short_lived_thread(
                    lambda: bare_step(loaded.model, all_ids[0], rows, args.steps)))
                timed["ours"][rows].append(in_short_lived_thread(lambda: our_step(loaded, all_ids, rows, args.steps)))
    bare = {rows: statistics.median(t) for rows, t in timed["bare"].items()}
    ours = {rows: statistics.median(t) for rows, t in timed["ours"].items()}
    result["step_ms"] = {"bare": {r: round(s * 1000, 2) for r, s in bare.items()},
                         "ours": {r: round(s * 1000, 2) for r, s in ours.items()}}
    result["step_ratio"] = {"bare": {r: round(s / bare[1], 2) for r, s in bare.items()},
                            "ours": {r: round(s / ours[1], 2) for r, s in ours.items()}}
    print("step ms (bare / ours):", {r: (result["step_ms"]["bare"][r], result["step_ms"]["ours"][r]) for r in ROWS},
          flush=True)

    streams(manager, all_ids, 2, 8)  # warm-up
    runs: dict[int, list[tuple[float, float, int]]] = {n: [] for n in ROWS}
    for round_ in range(args.rounds):
        for count in ROWS:
            runs[count].append(streams(manager, all_ids, count, args.tokens))
            print(f"round {round_ + 1}: {count} streams {runs[count][-1][0]:.1f} tok/s, "
                  f"TTFT {runs[count][-1][1]:.2f} s", flush=True)
    agg = {n: statistics.median(r[0] for r in runs[n]) for n in ROWS}
    result["agg_tok_s"] = {n: round(v, 2) for n, v in agg.items()}
    result["agg_ratio"] = {n: round(v / agg[1], 2) for n, v in agg.items()}
    result["ttft_s"] = {n: round(statistics.median(r[1] for r in runs[n]), 3) for n in ROWS}
    result["cut_short"] = sum(r[2] != n * args.tokens for n in ROWS for r in runs[n])
    if args.library_cb:
        result.update(in_short_lived_thread(lambda: library_cb(manager, all_ids, args.tokens)))
    manager.unload()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
