"""The GPTQModel work of modules.quantize.gptq, in a child process (so a Stop kills it and its memory goes back):

    python -m modules.quantize.gptq_child JOB.json

JOB.json holds the source folder, the target folder, the QuantSpec's fields and the calibration documents (a list
per file, see gptq.read_calibration). It prints `workbench: loaded`, then `workbench: layer I/N` as each decoder
layer is quantized, then `workbench: saving`; a failure ends in one `workbench: error: ...` line and exit status 1.
GPTQModel draws its progress bars on the same output, so these may follow a bar on its line.

Calibration samples: a raw text is cut into consecutive windows of `seq_len` tokens, a record (a chat or an
instruction with its answer, in the model's chat template) is one sample cut to `seq_len`; each file's samples
are shuffled with a fixed seed and the files take turns, so each contributes about equally.

GPTQModel quantizes on the GPU when there is one, else on the CPU (its torch kernels; AWQ names its torch kernel
there, as its default is a CUDA one). Its offload of finished layers to disk is off: on this machine's disk it
took 133 s of a 135M model's 188 s, against 55 s without (the model must fit in memory, which make_quantized
checks).
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

MIN_TOKENS = 10  # GPTQModel drops shorter samples


def calibration_samples(files: list[list[dict[str, Any]]], tokenizer: Any, samples: int,
                        seq_len: int) -> list[dict[str, list[int]]]:
    """At most `samples` token samples of at most `seq_len` tokens from the documents of each file."""
    pools = []
    for documents in files:
        pool: list[list[int]] = []
        for document in documents:
            if "messages" in document:
                ids = tokenizer(_chat_text(tokenizer, document["messages"]), add_special_tokens=False)["input_ids"]
                pool.append(ids[:seq_len])
            else:
                ids = tokenizer(document["text"], add_special_tokens=False)["input_ids"]
                pool.extend(ids[start:start + seq_len] for start in range(0, len(ids), seq_len))
        pool = [ids for ids in pool if len(ids) >= MIN_TOKENS]
        random.Random(0).shuffle(pool)
        pools.append(pool)
    picked: list[list[int]] = []
    for row in range(max((len(pool) for pool in pools), default=0)):
        for pool in pools:
            if row < len(pool) and len(picked) < samples:
                picked.append(pool[row])
    if not picked:
        raise ValueError(f"the calibration data holds no sample of at least {MIN_TOKENS} tokens")
    return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in picked]


def _chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(message["content"] for message in messages)


def quantize(job: dict[str, Any]) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    spec = job["spec"]
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(job["source"])
    samples = calibration_samples(job["documents"], tokenizer, spec["samples"], spec["seq_len"])
    settings: dict[str, Any] = {"bits": spec["bits"], "group_size": spec["group_size"], "offload_to_disk": False}
    if spec["method"] == "awq":  # with zero points, as AutoAWQ made them: symmetric AWQ lost 20% more perplexity here
        settings.update(method="awq", format="gemm", sym=False)
    else:
        settings.update(desc_act=spec["desc_act"], act_group_aware=not spec["desc_act"])
    model = GPTQModel.load(job["source"], QuantizeConfig(**settings), device="cuda:0" if cuda else "cpu")
    layers = int(getattr(model.model.config.get_text_config(), "num_hidden_layers", 0) or 1)
    print(f"workbench: loaded, {len(samples)} calibration samples, "
          f"{sum(len(s['input_ids']) for s in samples)} tokens", flush=True)
    done: set[int] = set()

    def layer_done(layer_idx: int, submodule_finalized: bool) -> None:
        if not submodule_finalized and layer_idx not in done:
            done.add(layer_idx)
            print(f"workbench: layer {len(done)}/{layers}", flush=True)

    model.layer_callback = layer_done
    backend = "awq_torch" if spec["method"] == "awq" and not cuda else "auto"
    with tempfile.TemporaryDirectory(prefix="gptqmodel-") as scratch:
        os.chdir(scratch)  # GPTQModel writes a log per layer pass into ./logs; the paths of the job are absolute
        model.quantize(samples, batch_size=1, backend=backend, calibration_data_min_length=MIN_TOKENS)
        print("workbench: saving", flush=True)
        model.save(job["target"])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("workbench: error: usage: python -m modules.quantize.gptq_child JOB.json", flush=True)
        return 2
    try:
        quantize(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    except Exception as exc:  # noqa: BLE001 (the parent shows this line as the reason)
        print(f"\nworkbench: error: {type(exc).__name__}: {' '.join(str(exc).split())}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
