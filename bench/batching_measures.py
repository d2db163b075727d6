"""Measures both batching benchmarks take (bench/llama_cpp_batching.py, bench/transformers_batching.py): the same
story prompts, a step cost taken as per-pair ratios of two batches stepped in turn (so the machine's drift touches
both alike), and rounds of N concurrent streams through the ModelManager."""
from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

from modules.chat.templates import render_chat
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager

ROWS = (1, 4, 8, 16)
TOPICS = ["a lighthouse", "a fox", "the sea", "a city at night", "a clock", "a garden", "a train", "the moon",
          "a library", "a storm", "a violin", "a desert", "a river", "a mountain", "a market", "a snowfall"]


def prompts(manager: ModelManager) -> list[list[int]]:
    """One short chat prompt per topic ("Write a story about ..."), as token ids of the loaded model."""
    model = manager.require_model()
    return [model.encode(render_chat(model.chat_template, [{"role": "user", "content": f"Write a story about {t}."}],
                                     add_generation_prompt=True)) for t in TOPICS]


def alternate(one: Callable[[], object], many: Callable[[], object], steps: int) -> tuple[float, float, float]:
    """(median seconds of `one`, of `many`, median of their per-pair ratios) over `steps` pairs after 3 warm-up
    pairs, the two called in turn."""
    ones, manys, ratios = [], [], []
    for step in range(steps + 3):
        started = time.perf_counter()
        one()
        middle = time.perf_counter()
        many()
        ended = time.perf_counter()
        if step >= 3:
            ones.append(middle - started)
            manys.append(ended - middle)
            ratios.append((ended - middle) / (middle - started))
    return statistics.median(ones), statistics.median(manys), statistics.median(ratios)


def streams(manager: ModelManager, all_ids: list[list[int]], count: int, tokens: int) -> tuple[float, float, int]:
    """(aggregate tokens/s, median time to first token, tokens made) of `count` concurrent greedy requests of
    `tokens` tokens each (EOS banned), each from a client of its own."""
    params = GenerationParams(do_sample=False, max_new_tokens=tokens, ban_eos_token=True)
    firsts: list[float] = []
    made = [0] * count
    started = time.perf_counter()

    def run(index: int) -> None:
        for chunk in manager.generate(all_ids[index % len(all_ids)], params, client=f"c{index}"):
            if chunk.tokens and not made[index]:
                firsts.append(time.perf_counter() - started)
            made[index] += len(chunk.tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(made) / (time.perf_counter() - started), statistics.median(firsts), sum(made)


def stream_rounds(manager: ModelManager, all_ids: list[list[int]], rounds: int, tokens: int) -> dict:
    """Rounds of 1, 4, 8 and 16 concurrent streams after a warm-up: the medians over rounds of the aggregate
    tokens/s (and relative to one stream) and of the time to first token, and how many streams were cut short."""
    streams(manager, all_ids, 2, 8)  # warm-up
    runs: dict[int, list[tuple[float, float, int]]] = {n: [] for n in ROWS}
    for round_ in range(rounds):
        for count in ROWS:
            runs[count].append(streams(manager, all_ids, count, tokens))
            print(f"round {round_ + 1}: {count} streams {runs[count][-1][0]:.1f} tok/s, "
                  f"TTFT {runs[count][-1][1]:.2f} s", flush=True)
    agg = {n: statistics.median(r[0] for r in runs[n]) for n in ROWS}
    return {"agg_tok_s": {n: round(v, 2) for n, v in agg.items()},
            "agg_ratio": {n: round(v / agg[1], 2) for n, v in agg.items()},
            "ttft_s": {n: round(statistics.median(r[1] for r in runs[n]), 3) for n in ROWS},
            "cut_short": sum(r[2] != n * tokens for n in ROWS for r in runs[n])}
