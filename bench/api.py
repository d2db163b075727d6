"""Streaming through the API next to the raw library, and 8 concurrent streams.

    python bench/api.py [--tokens 128] [--rounds 3] [--streams 8] [--stream-tokens 64]

The API runs in a child process (the workbench's own server on the starter GGUF, llama.cpp loader), measured by an
HTTP client here; the raw library is llama-cpp-python's own streaming completion on the same GGUF in this process.
The two alternate round by round on the same prompt, greedy with EOS banned, so both make exactly --tokens tokens;
medians are reported. Then --streams clients stream at once: aggregate tokens/s and how many were cut short (no
[DONE], an error, or fewer tokens than asked). The last line is one JSON object:
{"single": {"api_tok_s", "raw_tok_s", "ratio", "api_ttft_s", "raw_ttft_s"},
 "concurrent": {"streams", "aggregate_tok_s", "cut_short"}}
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules.cli import ArgumentParser  # noqa: E402
from needs import need_packages  # noqa: E402

need_packages("fastapi", "uvicorn", "httpx", "llama_cpp", requirements="requirements.txt")

QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."
N_CTX = 2048


def serve(port: int) -> None:
    """Child process: the API alone on the starter model."""
    from extensions.openai.server import create_app, serve_app
    from modules.model_manager import ModelManager
    from modules.services import Services
    from modules.settings import Settings
    from modules.starter import STARTER_GGUF

    settings = Settings(model_dir=ROOT / "models", lora_dir=ROOT / "loras", preset_dir=ROOT / "presets",
                        template_dir=ROOT / "instruction-templates", user_data_dir=ROOT / "user_data")
    manager = ModelManager(settings.model_dir, settings.lora_dir)
    manager.load(STARTER_GGUF, "llama.cpp", {"n_ctx": N_CTX})
    serve_app(create_app(Services(settings=settings, manager=manager)), "127.0.0.1", port)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream_api(client, url: str, prompt: str, tokens: int) -> tuple[float, float, int, bool]:
    """(time to first token, decode tokens/s after it, completion tokens, whether [DONE] arrived)."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "preset": "Deterministic",
            "ban_eos_token": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    usage, done, chunks = 0, False, 0
    with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            return 0.0, 0.0, 0, False
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 0.0, 0.0, 0, False
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0].get("finish_reason") is None:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return first - start, (usage - 1) / (end - first) if usage > 1 and end > first else 0.0, usage, done


def stream_raw(llama, ids: list[int], tokens: int) -> tuple[float, float, int, bool]:
    llama.reset()
    bias = {llama.token_eos(): float("-inf")}
    start = time.perf_counter()
    first, count = None, 0
    for chunk in llama.create_completion(ids, max_tokens=tokens, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                         repeat_penalty=1.0, stream=True, logit_bias=bias):
        if chunk["choices"][0]["finish_reason"] is None:
            count += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return first - start, (count - 1) / (end - first) if count > 1 else 0.0, count, True


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    import httpx
    import llama_cpp

    from modules.chat.templates import choose_template, render_chat
    from modules.starter import STARTER_GGUF

    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        if child.stdout.readline().strip() != b"ready":
            raise SystemExit("the API server did not start")
        url = f"http://127.0.0.1:{port}"
        llama = llama_cpp.Llama(model_path=str(ROOT / "models" / STARTER_GGUF), n_ctx=N_CTX, verbose=False)
        template = choose_template(llama.metadata.get("tokenizer.chat_template")).template
        prompt = render_chat(template, [{"role": "user", "content": QUESTION}], add_generation_prompt=True)
        ids = llama.tokenize(prompt.encode(), add_bos=False, special=True)
        with httpx.Client() as client:
            stream_api(client, url, prompt, 8)  # warm-up both paths
            stream_raw(llama, ids, 8)
            results: dict[str, list[tuple[float, float, int, bool]]] = {"api": [], "raw": []}
            for _ in range(args.rounds):
                results["api"].append(stream_api(client, url, prompt, args.tokens))
                results["raw"].append(stream_raw(llama, ids, args.tokens))
        llama.close()
        single: dict[str, float] = {}
        for label in ("api", "raw"):
            counts = {r[2] for r in results[label]}
            if counts != {args.tokens}:
                raise SystemExit(f"{label} made {counts} tokens, expected {args.tokens}")
            single[f"{label}_tok_s"] = round(statistics.median(r[1] for r in results[label]), 2)
            single[f"{label}_ttft_s"] = round(statistics.median(r[0] for r in results[label]), 4)
        single["ratio"] = round(single["api_tok_s"] / single["raw_tok_s"], 3)
        print(f"single stream: API {single['api_tok_s']} tok/s (ttft {single['api_ttft_s']} s), raw "
              f"{single['raw_tok_s']} tok/s (ttft {single['raw_ttft_s']} s), ratio {single['ratio']}", flush=True)

        def one(_: int) -> tuple[float, float, int, bool]:
            with httpx.Client() as client:
                return stream_api(client, url, prompt, args.stream_tokens)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.streams) as pool:
            streams = list(pool.map(one, range(args.streams)))
        wall = time.perf_counter() - started
        total = sum(r[2] for r in streams)
        cut_short = sum(1 for r in streams if not r[3] or r[2] < args.stream_tokens)
        concurrent = {"streams": args.streams, "aggregate_tok_s": round(total / wall, 2), "cut_short": cut_short}
        print(f"{args.streams} concurrent streams: {concurrent['aggregate_tok_s']} tok/s together, "
              f"{cut_short} cut short", flush=True)
        print(json.dumps({"single": {k: single[k] for k in ("api_tok_s", "raw_tok_s", "ratio", "api_ttft_s",
                                                             "raw_ttft_s")}, "concurrent": concurrent}))
    finally:
        child.terminate()
        child.wait(timeout=30)


if __name__ == "__main__":
    main()
