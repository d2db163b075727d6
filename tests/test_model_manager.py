"""ModelManager: loading errors leave nothing behind, swaps free the old model, the queue is fair and cancellable."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, wait_until
from modules.errors import (ContextLengthExceeded, InvalidInput, ModelLoadError, NoModelLoaded, PathError,
                            UnsupportedParameter,
                            WorkbenchError)
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.starter import STARTER_GGUF

LONG = GenerationParams(do_sample=False, max_new_tokens=400, ban_eos_token=True)


def queued(manager: ModelManager) -> int:
    """Requests (generations, loads) waiting for their turn: the point at which a test knows one has queued."""
    return manager.waiting


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Path:
    folder = tmp_path_factory.mktemp("models")
    (folder / STARTER_GGUF).symlink_to(starter_gguf)
    data = starter_gguf.read_bytes()
    (folder / "truncated.gguf").write_bytes(data[: len(data) // 3])
    (folder / "garbage.gguf").write_bytes(b"this is not a model at all" * 100)
    (folder / "header-only.gguf").write_bytes(data[:64])
    unreadable = folder / "unreadable.gguf"
    unreadable.write_bytes(data[:1024])
    huge = folder / "huge-model"
    huge.mkdir()
    (huge / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with open(huge / "model.safetensors", "wb") as handle:  # sparse: claims 4 TB without using disk
        handle.truncate(4 * 2**40)
    pickled = folder / "pickled-model"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    return folder


@pytest.fixture(scope="module")
def manager(model_dir: Path) -> ModelManager:
    # one slot (also when a test loads again): these tests are about the queue
    manager = ModelManager(model_dir, model_dir / "loras", loader_options={"parallel": 1})
    manager.load(STARTER_GGUF)
    yield manager
    manager.unload()


@pytest.mark.parametrize("name, message", [
    ("missing.gguf", "No model named"),
    ("../etc/passwd", "climbs out"),
    ("/etc/passwd", "absolute"),
    ("..\\models", "backslash"),
    pytest.param("truncated.gguf", "truncated", marks=pytest.mark.slow),  # llama.cpp reads it all, then refuses
    ("garbage.gguf", "not a GGUF file"),
    ("header-only.gguf", "corrupt or truncated"),
    pytest.param("huge-model", "Not enough memory", marks=pytest.mark.slow),  # measures the machine's memory first
    ("pickled-model", "pickle"),
])
def test_load_errors_are_clear_and_leave_no_model(model_dir: Path, name: str, message: str):
    manager = ModelManager(model_dir, model_dir / "loras")
    with pytest.raises((ModelLoadError, PathError)) as error:
        manager.load(name)
    assert message.lower() in str(error.value).lower()
    assert manager.model is None
    with pytest.raises(NoModelLoaded):
        manager.complete("Hi", GenerationParams(max_new_tokens=2))


def test_wrong_loader_is_a_clear_error(model_dir: Path):
    manager = ModelManager(model_dir, model_dir / "loras")
    with pytest.raises(ModelLoadError, match="holds no .gguf file"):
        manager.load("huge-model", "llama.cpp")
    with pytest.raises(WorkbenchError, match="Unknown loader"):
        manager.load(STARTER_GGUF, "exllama-9000")
    assert manager.model is None


@pytest.mark.slow  # loads, fails a load, loads again
def test_failed_swap_leaves_nothing_half_loaded(manager: ModelManager):
    with pytest.raises(ModelLoadError):
        manager.load("truncated.gguf")
    assert manager.model is None and manager.info() is None
    manager.load(STARTER_GGUF)
    assert manager.complete("Hi", GenerationParams(do_sample=False, max_new_tokens=2)).stats.completion_tokens >= 1


def test_list_models_shows_files_and_folders_loaded_first(manager: ModelManager):
    names = manager.list_models()
    assert names[0] == STARTER_GGUF
    assert {"truncated.gguf", "huge-model", "pickled-model"} <= set(names)


def test_cancel_frees_the_queue_for_the_next_request_at_once(manager: ModelManager):
    first = manager.generate("Once upon a time", LONG)
    second_done = threading.Event()
    results: dict[str, object] = {}

    def second_client() -> None:
        results["second"] = manager.complete("Hello", GenerationParams(do_sample=False, max_new_tokens=3))
        second_done.set()

    iterator = iter(first)
    next(iterator)  # first is running
    waiter = threading.Thread(target=second_client)
    waiter.start()
    wait_until(lambda: queued(manager) == 1, "the second request joins the queue")
    for _ in range(3):
        next(iterator)  # the first goes on...
    assert not second_done.is_set()  # ...and the second waits behind it
    first.cancel()
    for _ in iterator:
        pass
    assert second_done.wait(timeout=60)
    assert first.stats.finish_reason == "cancelled" and first.stats.completion_tokens < LONG.max_new_tokens
    assert results["second"].stats.completion_tokens >= 1
    waiter.join()


def test_a_request_cancelled_while_queued_never_runs(manager: ModelManager):
    running = manager.generate("Once upon a time", LONG)
    iterator = iter(running)
    next(iterator)
    queued = manager.generate("Hello", GenerationParams(max_new_tokens=3))
    queued.cancel()
    assert list(queued) == []
    assert queued.stats.finish_reason == "cancelled" and queued.stats.completion_tokens == 0
    running.cancel()
    list(iterator)


def test_closing_the_stream_early_frees_the_queue(manager: ModelManager):
    generation = manager.generate("Once upon a time", LONG)
    iterator = iter(generation)
    next(iterator)
    iterator.close()  # a client that disconnects
    wait_until(lambda: not manager.busy, "the engine drops the request", timeout_s=10)
    assert manager.complete("Hi", GenerationParams(do_sample=False, max_new_tokens=2)).stats.completion_tokens >= 1


def test_swap_waits_for_the_running_generation(manager: ModelManager):
    generation = manager.generate("Once upon a time", GenerationParams(do_sample=False, max_new_tokens=30,
                                                                       ban_eos_token=True))
    iterator = iter(generation)
    next(iterator)
    swapped = threading.Event()
    thread = threading.Thread(target=lambda: (manager.load(STARTER_GGUF), swapped.set()))
    thread.start()
    wait_until(lambda: manager.loading is not None, "the swap begins (and waits for the running request)")
    next(iterator)
    assert not swapped.is_set()  # never swapped under a running request
    rest = list(iterator)
    assert generation.stats.completion_tokens == 30 and rest
    thread.join(timeout=60)
    assert swapped.is_set()


def test_swap_can_cancel_the_running_generation(manager: ModelManager):
    generation = manager.generate("Once upon a time", LONG)
    iterator = iter(generation)
    next(iterator)
    consumer = threading.Thread(target=lambda: list(iterator))
    consumer.start()
    manager.load(STARTER_GGUF, cancel_running=True)
    consumer.join(timeout=60)
    assert not consumer.is_alive()
    assert generation.stats.finish_reason == "cancelled"
    assert generation.stats.completion_tokens < LONG.max_new_tokens  # the swap did not wait for the end


SWAP_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import psutil
    sys.path.insert(0, sys.argv[1])
    # Import both backends and the modeling code first so the baseline holds the code, not the weights.
    import llama_cpp, torch, transformers.generation.utils
    from transformers import LlamaForCausalLM
    import loaders.llama_cpp_loader, loaders.transformers_loader, modules.samplers
    from modules.model_manager import ModelManager
    from modules.generation_params import GenerationParams
    rss = lambda: psutil.Process().memory_info().rss
    manager = ModelManager(Path(sys.argv[2]), Path(sys.argv[2]) / "loras")
    base = rss()
    sizes = {"base": base}
    if sys.argv[3] == "swap":
        manager.load(sys.argv[4], "transformers", {"dtype": "float32"})
        manager.complete("Hi", GenerationParams(max_new_tokens=2))
        sizes["with_a"] = rss()
    manager.load(sys.argv[5], "llama.cpp")
    manager.complete("Hi", GenerationParams(max_new_tokens=2))
    sizes["with_b"] = rss()
    manager.unload()
    print(json.dumps(sizes))
""")


def _memory(mode: str, starter_hf: Path, starter_gguf: Path) -> dict[str, int]:
    result = subprocess.run([sys.executable, "-c", SWAP_SCRIPT, str(ROOT), str(starter_hf.parent), mode,
                             starter_hf.name, starter_gguf.name], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # loads models in child processes and measures their memory
def test_swap_returns_memory_to_about_the_second_model_alone(starter_hf: Path, starter_gguf: Path):
    swap = _memory("swap", starter_hf, starter_gguf)
    alone = _memory("alone", starter_hf, starter_gguf)
    a_cost = swap["with_a"] - swap["base"]
    b_after_swap = swap["with_b"] - swap["base"]
    b_alone = alone["with_b"] - alone["base"]
    assert a_cost > 400 * 2**20, swap  # float32 135M parameters: A really was resident
    # What is left of A after the swap is small next to A itself (without the fix it was all of A).
    assert b_after_swap - b_alone < min(120 * 2**20, a_cost // 4), (swap, alone)


def test_unload_then_generate_says_no_model(model_dir: Path):
    manager = ModelManager(model_dir, model_dir / "loras")
    manager.load(STARTER_GGUF)
    manager.unload()
    assert manager.model is None
    with pytest.raises(NoModelLoaded, match="No model is loaded"):
        manager.complete("Hi", GenerationParams(max_new_tokens=2))


@pytest.mark.slow  # two generations of 120 tokens
def test_ui_stream_batches_hold_every_token_in_few_updates(manager: ModelManager):
    """The browser gets the whole reply, in order, in at most one update per interval (plus the first token)."""
    from modules.ui.streaming import stream_batches

    interval = 0.2
    params = GenerationParams(do_sample=False, max_new_tokens=120, ban_eos_token=True)
    generation = manager.generate("Once upon a time", params)
    started = time.monotonic()
    batches = list(stream_batches(generation, interval_s=interval, first_wait_s=60))
    seconds = time.monotonic() - started
    assert all(batches) and "".join(c.text for b in batches for c in b) == generation.text
    assert sum(len(b) for b in batches) >= 100 > len(batches)
    assert len(batches) <= seconds / interval + 2
    assert generation.text == manager.complete("Once upon a time", params).text


def test_ui_stream_batches_send_a_first_update_soon_even_without_a_token(manager: ModelManager):
    """The page shows the user's message after `first_wait_s` at the latest, also when no token ever comes."""
    from modules.ui.streaming import stream_batches

    generation = manager.generate("Once upon a time", GenerationParams(do_sample=False, max_new_tokens=20,
                                                                        ban_eos_token=True))
    batches = list(stream_batches(generation, first_wait_s=0.0))  # no prompt is processed in no time
    assert batches[0] == [] and batches[1:] and all(batches[1:])
    assert "".join(c.text for b in batches for c in b) == generation.text != ""

    stopped = manager.generate("Once upon a time", LONG)
    stopped.cancel()  # Stop pressed before the first token
    assert list(stream_batches(stopped, first_wait_s=60)) == [[]]
    assert stopped.stats.completion_tokens == 0


def test_ui_stream_batches_closed_early_cancel_the_generation(manager: ModelManager):
    from modules.ui.streaming import stream_batches

    generation = manager.generate("Once upon a time", LONG)
    batches = stream_batches(generation, interval_s=0.05)
    next(batches)
    batches.close()  # the page went away
    wait_until(lambda: not manager.busy, "the queue is free once the page went away")
    assert generation.stats.finish_reason == "cancelled" and generation.stats.completion_tokens < 400


def test_a_prompt_longer_than_the_context_is_cut_or_refused_before_it_queues(manager: ModelManager):
    context = manager.model.context_length
    params = GenerationParams(do_sample=False, max_new_tokens=4)
    ids = manager.encode(" hello") * context
    with manager.exclusive():  # the queue is held: making a generation still tokenizes and checks it at once
        cut = manager.generate(ids, params)
        assert len(cut.prompt_ids) == context - 4 and "were cut" in cut.warnings[-1]
        with pytest.raises(ContextLengthExceeded) as refused:
            manager.generate(ids, params, cut_to_fit=False)
        assert (refused.value.context, refused.value.prompt_tokens, refused.value.max_new_tokens) == (context, context, 4)
        assert f"context is {context} tokens; the prompt has {context} tokens and max_tokens asks 4" in str(refused.value)
        with pytest.raises(ContextLengthExceeded, match="has at least") as by_size:  # too long whatever its tokens
            manager.generate("word " * context * 100, params, cut_to_fit=False)
        assert not by_size.value.exact and by_size.value.prompt_tokens > context
        fits = manager.generate("Hello", params, cut_to_fit=False)
        assert fits.prompt_ids == manager.encode("Hello", add_bos=True) and not fits.warnings


def test_a_long_chat_tokenizes_in_pieces_to_the_same_ids_as_whole(manager: ModelManager):
    """llama.cpp's special-token partition is quadratic in a long text; the loader tokenizes such a text in pieces
    cut before special tokens, which must give exactly the ids of one call."""
    words = "the quick brown fox jumps over a lazy dog while 漢字 and émojis 😀 appear".split()
    chat = "".join(f"<|im_start|>{('user', 'assistant')[n % 2]}\n{' '.join(words[: 3 + n % 11])}<|im_end|>\n"
                   for n in range(3000))
    llama = manager.model._llama
    for add_bos in (False, True):
        whole = llama.tokenize(chat.encode("utf-8"), add_bos=add_bos, special=True)
        assert len(chat.encode("utf-8")) > 10 * 16 * 1024  # long enough to be cut in several pieces
        assert manager.encode(chat, add_bos=add_bos) == whole


def test_a_request_with_its_own_loras_on_a_model_serving_one_at_a_time_is_refused(manager: ModelManager):
    """One slot means no per-request adapters (the model's own LoRAs apply to everyone): said, never ignored."""
    from loaders.batching import Adapter

    assert manager.require_model().slots == 1
    with pytest.raises(UnsupportedParameter, match="--parallel"):
        manager.complete("Hi", GenerationParams(max_new_tokens=2), adapters=(Adapter("some-lora"),))
    assert manager.complete("Hi", GenerationParams(max_new_tokens=2), adapters=()).text is not None


def test_a_request_naming_a_lora_that_is_not_there_is_refused_by_a_batching_model(model_dir: Path):
    from loaders.batching import Adapter

    batching = ModelManager(model_dir, model_dir / "loras")
    batching.load(STARTER_GGUF, "llama.cpp", {"parallel": 2})
    try:
        with pytest.raises(InvalidInput, match="some-lora"):
            batching.complete("Hi", GenerationParams(max_new_tokens=2), adapters=(Adapter("some-lora"),))
        assert batching.complete("Hi", GenerationParams(max_new_tokens=2)).text is not None
    finally:
        batching.unload()


@pytest.mark.slow
def test_the_memory_budget_evicts_the_least_recently_used_and_refuses_a_model_too_big(starter_gguf: Path,
                                                                                      tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("first.gguf", "second.gguf"):  # the starter under two names: two residents
        (models / name).symlink_to(starter_gguf)
    options = {"n_ctx": 512, "parallel": 1}
    probe = ModelManager(models, tmp_path, loader_options=options)
    try:
        probe.load("first.gguf")
        used, size = probe.pool.memory_used(), probe.plan("second.gguf").size
    finally:
        probe.close()
    manager = ModelManager(models, tmp_path, loader_options=options, max_models=4, memory_budget=used + size - 1)
    try:
        manager.load("first.gguf")
        manager.load("second.gguf")  # both do not fit: the first makes room although the model count would allow it
        assert [r.name for r in manager.pool.all()] == ["second.gguf"]
        assert manager.pool.evictions == 1
    finally:
        manager.close()
    small = ModelManager(models, tmp_path, loader_options=options, memory_budget=size // 2)
    try:
        with pytest.raises(ModelLoadError, match="more than --memory-budget"):
            small.load("first.gguf")
        assert small.pool.all() == []
    finally:
        small.close()
