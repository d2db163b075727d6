"""Why the model manager loads models in a short-lived thread (see modules/cpu_threads.py).

    python bench/openmp_threads.py [--tokens 128] [--rounds 3] [--model SmolLM2-135M-Instruct]

Loads a Transformers model through the ModelManager, then measures a greedy generation run the way the web UI and
the API run it (in a fresh thread) twice: first as the app leaves things (no long-lived thread has run the model),
then after the main thread has run one generation itself, as it did when the start-up model was loaded in the main
thread. The last line is one JSON object: {"fresh_tok_s", "after_main_thread_tok_s", "ratio"}
(ratio = fresh / after_main_thread; above 1 is what the short-lived threads save).
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

from modules.generation_params import GenerationParams  # noqa: E402
from modules.model_manager import ModelManager  # noqa: E402
from modules.starter import STARTER_HF_DIR  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to cook."


def tokens_per_second(manager: ModelManager, tokens: int) -> float:
    params = GenerationParams(do_sample=False, max_new_tokens=tokens, ban_eos_token=True)
    started = time.perf_counter()
    count = sum(len(chunk.tokens) for chunk in manager.generate(PROMPT, params))
    assert count == tokens, count
    return tokens / (time.perf_counter() - started)


def in_fresh_thread(manager: ModelManager, tokens: int) -> float:
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(tokens_per_second(manager, tokens)))
    thread.start()
    thread.join()
    return result[0]


def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=STARTER_HF_DIR)
    args = parser.parse_args()
    manager = ModelManager(ROOT / "models", ROOT / "loras")
    manager.load(args.model, "transformers")
    in_fresh_thread(manager, 8)  # warm-up
    fresh = [in_fresh_thread(manager, args.tokens) for _ in range(args.rounds)]
    tokens_per_second(manager, 8)  # the main thread now holds an OpenMP team for the rest of the process
    after = [in_fresh_thread(manager, args.tokens) for _ in range(args.rounds)]
    manager.unload()
    fresh_tok_s, after_tok_s = statistics.median(fresh), statistics.median(after)
    print(json.dumps({"fresh_tok_s": round(fresh_tok_s, 2), "after_main_thread_tok_s": round(after_tok_s, 2),
                      "ratio": round(fresh_tok_s / after_tok_s, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
