"""Continuous batching for the llama.cpp loader: up to `parallel` sequences share one context and advance together,
one llama_decode per step.

The context is made with one sequence id per slot (n_seq_max) and, by default, a unified KV cache: every sequence
may use the whole n_ctx, and together they share its cells (kv_unified off: n_ctx/parallel each). How a step goes (one call of `step`, from the engine's thread):
- Each generating sequence puts its last token in the batch. A sequence still reading its prompt puts the next
  piece of it, up to the next multiple of PROMPT_CHUNK positions (the alignment the single-sequence loop reads in);
  while any sequence generates, a step reads at most one such chunk of prompt in all, so a long prompt never
  stalls the others; with none generating, prompts are read a chunk per sequence up to n_batch tokens.
- Each sequence samples from its own row of logits with its own native sampler chains (mask, then choose: a
  grammar is never handed a token it masked), assembles its UTF-8 text and log-probabilities, and ends on its
  end-of-generation token, max_new_tokens, or a full context ("length").
- A sequence that ends or is removed frees its slot but leaves its KV in the cache: the next request whose prompt
  starts the same way (the next turn of the conversation) takes the slot with the longest reusable prefix, and
  llama_memory_seq_rm drops the rest, as llama.cpp's server does. Only prompt tokens are reused (generated ones
  were computed one at a time), from a multiple of PROMPT_CHUNK, under the same LoRA weights. When a step needs
  cells the cache no longer has, idle slots give theirs up, least recently used first; in a unified cache they
  also do when a sequence starts while none runs (see below).
- LoRA adapters apply to the whole context, so the running sequences share one adapter set (`accepts`); the set
  is switched on the context when a new group starts, and the model's applied set is put back when it drains.

What batching changes: llama.cpp's arithmetic depends on the batch and on where a sequence's cells lie in the cache
(how sums over them are split into SIMD lanes; a quantized model's activations round to 8 bits, which magnifies the
last bits), so a reply may differ by a near-tie token when other sequences run beside it: measured on the starter
(Q4_1), log-probabilities moved by up to 0.17 nats over 8 tokens when other conversations held cells of the unified
cache. So a sequence that starts while none runs gets the unified cache to itself (the idle slots give up their KV;
its own slot's prefix stays): a request alone gives the same tokens as in a fresh context, warm or cold (prompts are
read in the same aligned chunks). With kv_unified off each slot's cache starts at cell 0 of its own stream, so a
request gives the same tokens alone whatever the other slots hold, and idle slots keep their KV. parallel 1 is the
single-sequence loop, bit for bit as before.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np

from loaders.batching import Adapter, BatchDecoder, SequenceRequest, StepOutput
from loaders.llama_cpp_loader import PROMPT_CHUNK, utf8_pieces
from loaders.llama_cpp_sampling import Candidates, SamplerChains, build_sampler_chains
from modules.errors import ContextLengthExceeded, GenerationError, InvalidInput
from modules.generation_params import TokenEvent

if TYPE_CHECKING:
    from loaders.llama_cpp_loader import LlamaCppModel

_FLASH_TYPES = {"on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}


class _LlamaWithSlots(llama_cpp.Llama):
    """llama_cpp.Llama whose context holds `n_seq_max` sequences in a unified KV cache. Llama's constructor takes
    neither setting and creates its context at once; its context parameters are read through this property, so
    the context is made once, with them, instead of being replaced (which would hold two KV caches while loading).
    """

    def __init__(self, n_seq_max: int, flash_attn_type: int, kv_unified: bool, **kwargs: Any):
        self._slots_settings = (n_seq_max, flash_attn_type, kv_unified)
        super().__init__(**kwargs)

    @property
    def context_params(self) -> Any:
        params = self.__dict__["_slots_context_params"]
        params.n_seq_max, params.flash_attn_type = self._slots_settings[:2]
        params.kv_unified = self._slots_settings[2]
        return params

    @context_params.setter
    def context_params(self, value: Any) -> None:
        self.__dict__["_slots_context_params"] = value


def llama_with_slots(parallel: int, flash: str, unified: bool, **kwargs: Any) -> llama_cpp.Llama:
    """A Llama whose context has `parallel` sequences in one unified KV cache (or n_ctx/parallel each); flash
    attention on, off or auto (llama.cpp's choice: on wherever the device supports it)."""
    return _LlamaWithSlots(parallel, _FLASH_TYPES[flash], unified, **kwargs)


@dataclass(eq=False)
class _Slot:
    """A sequence id of the context and what its KV holds."""

    seq: int
    tokens: list[int] = field(default_factory=list)  # the token at each position of its KV
    prompt_read: int = 0  # leading tokens read as prompt (reusable); the rest were generated one at a time
    adapters: tuple = ()  # the key of the LoRA weights its KV was computed under
    used: int = 0  # the step it last served, for least-recently-used choices
    sequence: _Sequence | None = None


@dataclass(eq=False)
class _Sequence:
    key: int
    request: SequenceRequest
    slot: _Slot
    prompt: list[int]
    chains: SamplerChains
    text: codecs.IncrementalDecoder = field(default_factory=utf8_pieces)
    read: int = 0  # prompt tokens in the KV
    generated: int = 0
    last: int = -1  # the token to feed at the next step

    @property
    def generating(self) -> bool:
        return self.read == len(self.prompt)


class LlamaCppBatch(BatchDecoder):
    """The slots of a LlamaCppModel's context, decoded together. Used from one thread at a time."""

    def __init__(self, model: LlamaCppModel):
        self.model = model
        self.slots = model.slots
        llama = model._llama
        self._ctx = llama._ctx.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_ctx = model.context_length  # what one sequence may fill
        self._unified = model.options.kv_unified
        self._n_batch = llama.n_batch
        self._chunk = min(PROMPT_CHUNK, self._n_batch)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._candidates = Candidates(llama_cpp, model._n_vocab)
        self._slots = [_Slot(seq) for seq in range(self.slots)]
        self._sequences: dict[int, _Sequence] = {}  # in admission order
        self._group: tuple | None = None  # the adapter key of the running sequences
        self._steps = 0

    # --- the seam ------------------------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._sequences)

    def accepts(self, adapters: tuple[Adapter, ...] | None) -> bool:
        if not self._sequences:
            return True
        try:
            return self.model.adapter_key(adapters) == self._group
        except InvalidInput:
            return False  # waits until the batch drains; add() then tells the request why

    def add(self, key: int, request: SequenceRequest) -> None:
        model, params = self.model, request.params
        prompt = request.prompt
        ids = model.encode(prompt, add_bos=params.add_bos_token) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidInput("The prompt is empty: there is nothing to continue.")
        if len(ids) >= self._n_ctx:
            raise ContextLengthExceeded(context=self._n_ctx, prompt_tokens=len(ids),
                                        max_new_tokens=params.max_new_tokens)
        adapters = model.adapter_key(request.adapters)
        if self._sequences and adapters != self._group:
            raise GenerationError("A sequence with other LoRA adapters cannot join the running ones.")
        chains = build_sampler_chains(llama_cpp, model._llama, params, ids, eog_tokens=model._eog)
        try:
            if not self._sequences:
                self._group = model.use_adapters(request.adapters)
        except BaseException:
            chains.free(llama_cpp)
            raise
        slot = self._take_slot(ids, adapters)
        sequence = _Sequence(key, request, slot, ids, chains, read=len(slot.tokens))
        slot.sequence = sequence
        self._sequences[key] = sequence

    def step(self) -> list[StepOutput]:
        self._steps += 1
        outputs: list[StepOutput] = []
        running = [s for s in self._sequences.values() if not s.request.cancel.is_set()]
        for sequence in [s for s in running if s.generating and len(s.slot.tokens) >= self._n_ctx]:
            outputs.append(self._end(sequence, "length"))  # its own positions fill the context
            running.remove(sequence)
        generating = [s for s in running if s.generating]
        while running and not self._make_room(len(generating)):  # the live sequences fill the cache
            victim = max(running, key=lambda s: len(s.slot.tokens))
            outputs.append(self._end(victim, "length"))
            running.remove(victim)
            generating = [s for s in running if s.generating]
        reads = self._plan_reads([s for s in running if not s.generating], len(generating))
        if not generating and not reads:
            waiting = [s for s in running if not s.generating]
            if waiting and len(running) == len(self._sequences):
                # half-read prompts fill the cache (none is cancelled and about to leave): the youngest holding
                # cells gives way
                holding = [s for s in waiting[1:] if s.slot.tokens] or waiting
                outputs.append(self._end(holding[-1], "length"))
            return outputs
        rows = self._fill_batch(generating, reads)
        code = llama_cpp.llama_decode(self._ctx, self._batch)
        if code != 0:
            raise GenerationError(f"llama.cpp failed to decode a batch of {self._batch.n_tokens} tokens "
                                  f"(code {code}).")
        for sequence in generating:
            sequence.slot.tokens.append(sequence.last)
        for sequence, count in reads:
            sequence.slot.tokens += sequence.prompt[sequence.read:sequence.read + count]
            sequence.read += count
            sequence.slot.prompt_read = sequence.read
            self.model.evaluated_prompt_tokens += count
        for sequence, row in rows:
            outputs.append(self._sample(sequence, row))
        return outputs

    def remove(self, key: int) -> None:
        sequence = self._sequences.pop(key, None)
        if sequence is None:
            return
        sequence.chains.free(llama_cpp)
        slot = sequence.slot
        slot.sequence, slot.used = None, self._steps
        if not self._sequences:
            self._group = None
            self.model.use_applied_adapters()

    def close(self) -> None:
        for key in list(self._sequences):
            self.remove(key)

    def forget(self) -> None:
        """Forget what each slot's KV held: the model read a prompt with images into the context alone and
        emptied the cache after it."""
        for slot in self._slots:
            slot.tokens, slot.prompt_read = [], 0

    def release(self) -> None:
        """Free the batch buffer (the model is being unloaded)."""
        self.close()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    # --- slots and their cache -----------------------------------------------------------------------------------
    def _take_slot(self, ids: list[int], adapters: tuple) -> _Slot:
        """The free slot whose KV gives the longest reusable prefix of `ids` (else an empty one, else the least
        recently used), its KV cut to that prefix."""
        reuse: dict[int, int] = {}
        for slot in self._slots:
            if slot.sequence is None:
                self._check_cache(slot)
                reuse[slot.seq] = self._reusable(slot, ids, adapters)
        if not reuse:
            raise GenerationError("Every slot is busy.")  # the engine adds only while one is free
        best = max((self._slots[seq] for seq in reuse), key=lambda s: (reuse[s.seq], not s.tokens, -s.used))
        best_reuse = reuse[best.seq]
        if best_reuse < len(best.tokens):
            if best_reuse == 0 or not llama_cpp.llama_memory_seq_rm(self._memory, best.seq, best_reuse, -1):
                llama_cpp.llama_memory_seq_rm(self._memory, best.seq, -1, -1)
                best_reuse = 0
            del best.tokens[best_reuse:]
        best.prompt_read = min(best.prompt_read, best_reuse)
        best.adapters, best.used = adapters, self._steps
        if not self._sequences and self._unified:
            self._alone_in_cache(best)
        return best

    def _alone_in_cache(self, taken: _Slot) -> None:
        """A sequence that starts while none runs gets the unified cache to itself: the other idle slots give up
        their KV, so its cells lie where they would in a fresh context and a request alone repeats its reply
        exactly (where cells lie changes the arithmetic). Its own slot's reused prefix stays."""
        for slot in self._slots:
            if slot is not taken and slot.tokens:
                llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
                slot.tokens, slot.prompt_read = [], 0
        if not taken.tokens:
            llama_cpp.llama_memory_clear(self._memory, False)  # and the next cell is cell 0 again

    def _reusable(self, slot: _Slot, ids: list[int], adapters: tuple) -> int:
        """How much of `ids` the slot's KV may serve: its common prefix with the slot's prompt tokens, down to a
        multiple of the chunk, under the same adapters; the last prompt token is always evaluated (its logits
        pick the first token)."""
        if slot.adapters != adapters:
            return 0
        limit = min(slot.prompt_read, len(ids) - 1)
        common = 0
        while common < limit and slot.tokens[common] == ids[common]:
            common += 1
        return common // self._chunk * self._chunk

    def _check_cache(self, slot: _Slot) -> None:
        """Forget a slot's tokens when its KV is no longer there (something that drives the model directly, a
        perplexity run, cleared the cache)."""
        if slot.tokens and llama_cpp.llama_memory_seq_pos_max(self._memory, slot.seq) + 1 != len(slot.tokens):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            slot.tokens, slot.prompt_read = [], 0

    def _free_cells(self) -> int:
        return self._n_ctx - sum(len(slot.tokens) for slot in self._slots)

    def _make_room(self, cells: int) -> bool:
        """Whether `cells` more fit in the cache, emptying idle slots (least recently used first) as needed. A split
        cache has room for every sequence up to its share (step ends a sequence that reaches it)."""
        while self._unified and self._free_cells() < cells:
            idle = [slot for slot in self._slots if slot.sequence is None and slot.tokens]
            if not idle:
                return False
            slot = min(idle, key=lambda s: s.used)
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            slot.tokens, slot.prompt_read = [], 0
        return True

    # --- one step ------------------------------------------------------------------------------------------------
    def _plan_reads(self, reading: list[_Sequence], generating: int) -> list[tuple[_Sequence, int]]:
        """How many prompt tokens each reading sequence reads this step, oldest first: up to its next chunk
        boundary, at most one chunk in all while others generate, else up to n_batch. A prompt that finds no room
        waits, and the younger ones wait behind it."""
        budget = min(self._chunk if generating else self._n_batch, self._n_batch - generating)
        reads: list[tuple[_Sequence, int]] = []
        planned = generating
        for sequence in reading:
            if budget <= 0:
                break
            boundary = (sequence.read // self._chunk + 1) * self._chunk
            count = min(boundary, len(sequence.prompt)) - sequence.read
            count = min(count, budget)
            if not self._make_room(planned + count):
                break
            reads.append((sequence, count))
            planned += count
            budget -= count
        return reads

    def _fill_batch(self, generating: list[_Sequence], reads: list[tuple[_Sequence, int]]
                    ) -> list[tuple[_Sequence, int]]:
        """Write the step's tokens into the batch; returns the sequences that sample this step with their row."""
        batch = self._batch
        n = 0
        rows = []

        def put(token: int, position: int, seq: int, logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, position, 1, logits
            batch.seq_id[n][0] = seq
            n += 1

        for sequence in generating:
            rows.append((sequence, n))
            put(sequence.last, len(sequence.slot.tokens), sequence.slot.seq, True)
        for sequence, count in reads:
            start, seq = sequence.read, sequence.slot.seq
            end = start + count
            for position in range(start, end):
                last = position == len(sequence.prompt) - 1
                if last:
                    rows.append((sequence, n))
                put(sequence.prompt[position], position, seq, last)
        batch.n_tokens = n
        for sequence in generating:
            sequence.slot.used = self._steps
        for sequence, _ in reads:
            sequence.slot.used = self._steps
        return rows

    def _sample(self, sequence: _Sequence, row: int) -> StepOutput:
        model, params = self.model, sequence.request.params
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, row), shape=(model._n_vocab,))
        try:
            token = self._candidates.next_token(sequence.chains, logits)
        except GenerationError as exc:
            self.remove(sequence.key)
            return StepOutput(sequence.key, error=exc)
        if token is None:  # nothing may follow (a grammar at its end, with the end banned)
            return self._end(sequence, "stop")
        if model.is_end_of_generation(token) and not params.ban_eos_token:
            return self._end(sequence, "stop")
        event = TokenEvent(token_id=token, text=sequence.text.decode(
            model._piece(token, special=not params.skip_special_tokens)))
        if params.logprobs:
            model._fill_logprobs(event, params.logprobs, logits)
        sequence.generated += 1
        sequence.last = token
        if sequence.generated >= params.max_new_tokens:
            return self._end(sequence, "length", event)
        return StepOutput(sequence.key, event)

    def _end(self, sequence: _Sequence, finish: str, token: TokenEvent | None = None) -> StepOutput:
        self.remove(sequence.key)
        return StepOutput(sequence.key, token, finished=finish)  # type: ignore[arg-type]
