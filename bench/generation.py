"""Tokens/s and time to first token of our streaming path next to the raw library, in the same process.

    python bench/generation.py [--tokens 128] [--rounds 3] [--loaders llama_cpp transformers]

For each loader the two paths alternate round by round on the same loaded weights and the same prompt, greedy,
EOS banned so both produce exactly --tokens tokens; medians are reported. The last line is one JSON object:
{"llama_cpp": {...}, "transformers": {...}} with ours_tok_s, raw_tok_s, ratio, ours_ttft_s, raw_ttft_s.
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

need_packages("torch", "transformers", "llama_cpp", requirements="requirements.txt")

from modules.chat.templates import choose_template, render_chat  # noqa: E402
from modules.generation_params import GenerationParams  # noqa: E402
from modules.model_manager import ModelManager  # noqa: E402
from modules.starter import STARTER_GGUF, STARTER_HF_DIR  # noqa: E402

QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def timed_stream(events) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s after the first token, tokens) for an iterator of token batches."""
    start = time.perf_counter()
    first = None
    count = 0
    for batch in events:
        if batch and first is None:
            first = time.perf_counter()
        count += batch
    end = time.perf_counter()
    decode = (count - 1) / (end - first) if first is not None and count > 1 and end > first else 0.0
    return (first or end) - start, decode, count


def ours(manager: ModelManager, prompt: str, tokens: int) -> tuple[float, float, int]:
    params = GenerationParams(do_sample=False, max_new_tokens=tokens, ban_eos_token=True)
    generation = manager.generate(prompt, params)
    return timed_stream(len(chunk.tokens) for chunk in generation)


def raw_llama_cpp(manager: ModelManager, prompt: str, tokens: int) -> tuple[float, float, int]:
    model = manager.require_model()
    llama = model._llama
    llama.reset()
    ids = model.encode(prompt)
    bias = {llama.token_eos(): float("-inf")}
    stream = llama.create_completion(ids, max_tokens=tokens, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                     repeat_penalty=1.0, stream=True, logit_bias=bias)
    return timed_stream(1 for chunk in stream if chunk["choices"][0]["finish_reason"] is None)


def raw_transformers(manager: ModelManager, prompt: str, tokens: int) -> tuple[float, float, int]:
    import torch

    model = manager.require_model()
    ids = torch.tensor([model.encode(prompt)])
    marks: list[float] = []

    class Marker:
        def put(self, value):  # called once with the prompt, then once per new token
            marks.append(time.perf_counter())

        def end(self):
            pass

    start = time.perf_counter()
    with torch.inference_mode():
        out = model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                   streamer=Marker(), suppress_tokens=[model.tokenizer.eos_token_id],
                                   pad_token_id=model.tokenizer.eos_token_id, eos_token_id=None)
    end = time.perf_counter()
    count = out.shape[1] - ids.shape[1]
    first = marks[1] if len(marks) > 1 else end
    return first - start, (count - 1) / (end - first), count


def measure(name: str, manager: ModelManager, raw, tokens: int, rounds: int) -> dict[str, float]:
    model = manager.require_model()
    chosen = choose_template(model.chat_template)
    prompt = render_chat(chosen.template, [{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                         bos_token=model.bos_token, eos_token=model.eos_token)
    ours(manager, prompt, 8)  # warm-up both paths (allocations, compilation)
    raw(manager, prompt, 8)
    results: dict[str, list[tuple[float, float, int]]] = {"ours": [], "raw": []}
    for _ in range(rounds):
        for label, run in (("ours", lambda: ours(manager, prompt, tokens)), ("raw", lambda: raw(manager, prompt, tokens))):
            if model.loader_name == "llama.cpp":
                model._llama.reset()
                model._prompt_kv_valid = 0
            results[label].append(run())
    summary = {}
    for label in ("ours", "raw"):
        ttft = statistics.median(r[0] for r in results[label])
        speed = statistics.median(r[1] for r in results[label])
        counts = {r[2] for r in results[label]}
        assert counts == {tokens}, f"{name} {label} produced {counts} tokens, expected {tokens}"
        summary[f"{label}_tok_s"] = round(speed, 2)
        summary[f"{label}_ttft_s"] = round(ttft, 4)
    summary["ratio"] = round(summary["ours_tok_s"] / summary["raw_tok_s"], 3)
    print(f"{name}: ours {summary['ours_tok_s']} tok/s (ttft {summary['ours_ttft_s']} s), raw "
          f"{summary['raw_tok_s']} tok/s (ttft {summary['raw_ttft_s']} s), ratio {summary['ratio']}", flush=True)
    return {k: summary[k] for k in ("ours_tok_s", "raw_tok_s", "ratio", "ours_ttft_s", "raw_ttft_s")}


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loaders", nargs="+", default=["llama_cpp", "transformers"])
    parser.add_argument("--dtype", default="bfloat16", help="Transformers dtype for both paths.")
    parser.add_argument("--static-cache", action="store_true", help="Our Transformers path with a static KV cache "
                                                                    "and a compiled decode step.")
    args = parser.parse_args()
    manager = ModelManager(ROOT / "models", ROOT / "loras")
    report: dict[str, dict[str, float]] = {}
    if "llama_cpp" in args.loaders:
        manager.load(STARTER_GGUF, "llama.cpp")
        report["llama_cpp"] = measure("llama_cpp", manager, raw_llama_cpp, args.tokens, args.rounds)
    if "transformers" in args.loaders:
        manager.load(STARTER_HF_DIR, "transformers", {"dtype": args.dtype, "static_cache": args.static_cache})
        report["transformers"] = measure("transformers", manager, raw_transformers, args.tokens, args.rounds)
    manager.unload()
    print(json.dumps(report))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
