"""Many clients at once: our API next to its peers, on the same model, in the same run.

    python bench/serving.py [--clients 1 4 8 16] [--tokens 128] [--loaders llama_cpp transformers]
                            [--parallel N] [--no-peers]

For each loader, our API (the openai extension over a ModelManager with `--parallel` slots, in a child process)
and then a peer on the same weights are each sent 1, 4, 8 and 16 concurrent streaming clients. Each client asks one
short instruction from data/instruction-data.json (the n-th client the n-th record) for --tokens tokens, greedy,
through /v1/chat/completions. Peers: llama-cpp-python's own server (`python -m llama_cpp.server`) for the GGUF, and
`transformers serve --continuous-batching` for the Transformers folder. For each count: aggregate generated
tokens/s (all tokens over the wall time from the first request to the last token), time to first token p50/p95,
and how many streams were cut short (no [DONE], an error, or no tokens). The last line is one JSON object:
{"llama_cpp": {"single_tok_s", "agg_tok_s": {"4", "8", "16"}, "ttft_p50_s": {...}, "ttft_p95_s": {...},
 "peer_agg_tok_s": {...}, "peer_ttft_p95_s": {...}, "cut_short": n}, "transformers": {...}}
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules.cli import ArgumentParser  # noqa: E402
from needs import need_packages  # noqa: E402

need_packages("fastapi", "uvicorn", "httpx", "llama_cpp", "transformers", requirements="requirements.txt")

STARTUP_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(port: int, loader: str, parallel: int) -> None:
    """Child process: our API alone on the starter model (llama.cpp GGUF or its Transformers copy)."""
    from extensions.openai.server import create_app, serve_app
    from modules.model_manager import ModelManager
    from modules.services import Services
    from modules.settings import Settings
    from modules.starter import STARTER_GGUF, STARTER_HF_DIR

    settings = Settings(model_dir=ROOT / "models", lora_dir=ROOT / "loras", preset_dir=ROOT / "presets",
                        template_dir=ROOT / "instruction-templates", user_data_dir=ROOT / "user_data",
                        max_queue=0)
    manager = ModelManager(settings.model_dir, settings.lora_dir, max_queue=0)
    if loader == "llama_cpp":
        manager.load(STARTER_GGUF, "llama.cpp", {"n_ctx": 8192, "parallel": parallel})
    else:
        manager.load(STARTER_HF_DIR, "transformers", {"parallel": parallel})
    serve_app(create_app(Services(settings=settings, manager=manager)), "127.0.0.1", port)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def start(command: list[str], url: str, env: dict[str, str] | None = None, *,
          any_answer: bool = False) -> subprocess.Popen:
    """Start a server and wait until its /v1/models answers 200 (with `any_answer`, answers at all:
    `transformers serve` answers it with a 500 offline, while it scans the hub cache, and serves the folder it was
    given all the same)."""
    import httpx

    # a file, not a pipe: a server that logs much (llama.cpp's load) would block on a pipe nobody reads
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log,
                               env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{command[:4]} exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200 or any_answer:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{command[:4]} did not start within {STARTUP_S} s")


def stream(url: str, model: str, question: str, tokens: int) -> tuple[float | None, int, bool]:
    """(time to first token, tokens received, completed) of one streaming chat completion."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "temperature": 0, "stream": True}
    started = time.perf_counter()
    first, count, done = None, 0, False
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as response:
            if response.status_code != 200:
                return None, 0, False
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return None, count, False
                    for choice in chunk.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            count += 1
                            if first is None:
                                first = time.perf_counter() - started
    except httpx.HTTPError:
        return first, count, False
    return first, count, done


def measure(url: str, model: str, questions: list[str], clients: int, tokens: int) -> dict[str, float]:
    """Aggregate tokens/s and TTFT p50/p95 of `clients` concurrent streams (content chunks count as tokens)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(lambda i: stream(url, model, questions[i % len(questions)], tokens),
                                range(clients)))
    wall = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results if r[0] is not None)
    total = sum(r[1] for r in results)
    return {"agg_tok_s": round(total / wall, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else 0.0,
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3) if ttfts else 0.0,
            "cut_short": sum(1 for r in results if not r[2] or r[1] == 0)}


def run_loader(loader: str, args: argparse.Namespace, questions: list[str]) -> dict[str, object]:
    from modules.starter import STARTER_GGUF, STARTER_HF_DIR

    ours_port, peer_port = free_port(), free_port()
    ours_url, peer_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{peer_port}"
    result: dict[str, object] = {}
    ours = start([sys.executable, __file__, "--serve", str(ours_port), "--serve-loader", loader,
                  "--parallel", str(args.parallel)], ours_url)
    try:
        model = STARTER_GGUF if loader == "llama_cpp" else STARTER_HF_DIR
        stream(ours_url, model, questions[0], 8)  # warm-up
        figures = {n: measure(ours_url, model, questions, n, args.tokens) for n in args.clients}
    finally:
        ours.terminate()
        ours.wait(timeout=60)
    for n, numbers in figures.items():
        print(f"{loader} ours, {n} clients: {numbers}", flush=True)
    result["single_tok_s"] = figures[min(args.clients)]["agg_tok_s"]
    result["agg_tok_s"] = {str(n): figures[n]["agg_tok_s"] for n in args.clients if n > 1}
    result["ttft_p50_s"] = {str(n): figures[n]["ttft_p50_s"] for n in args.clients}
    result["ttft_p95_s"] = {str(n): figures[n]["ttft_p95_s"] for n in args.clients}
    result["cut_short"] = sum(int(f["cut_short"]) for f in figures.values())
    if not args.peers:
        return result
    if loader == "llama_cpp":
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(ROOT / "models" / STARTER_GGUF),
                   "--n_ctx", "8192", "--port", str(peer_port), "--host", "127.0.0.1"]
        peer_model = STARTER_GGUF
    else:
        command = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve",
                   "--continuous-batching", "--port", str(peer_port), "--host",
                   "127.0.0.1", str(ROOT / "models" / STARTER_HF_DIR)]
        peer_model = str(ROOT / "models" / STARTER_HF_DIR)
    peer = start(command, peer_url, {"HF_HUB_OFFLINE": "1"}, any_answer=loader == "transformers")
    try:
        stream(peer_url, peer_model, questions[0], 8)
        peer_figures = {n: measure(peer_url, peer_model, questions, n, args.tokens) for n in args.clients}
    finally:
        peer.terminate()
        peer.wait(timeout=60)
    for n, numbers in peer_figures.items():
        print(f"{loader} peer, {n} clients: {numbers}", flush=True)
    result["peer_agg_tok_s"] = {str(n): peer_figures[n]["agg_tok_s"] for n in args.clients}
    result["peer_ttft_p95_s"] = {str(n): peer_figures[n]["ttft_p95_s"] for n in args.clients}
    return result


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--loaders", nargs="+", choices=["llama_cpp", "transformers"],
                        default=["llama_cpp", "transformers"])
    parser.add_argument("--parallel", type=int, default=8, help="Slots of our model (the loaders' parallel).")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="Measure only ours.")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-loader", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.serve_loader, args.parallel)
        return
    records = json.loads((ROOT / "data" / "instruction-data.json").read_text())
    questions = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in records[:64]]
    results = {loader: run_loader(loader, args, questions) for loader in args.loaders}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
