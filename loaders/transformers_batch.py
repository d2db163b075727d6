"""Continuous batching for the Transformers loader: the rows of a batch are requests that join and leave between
decode steps, each with its own sampler chain, random generator, log-probabilities and LoRA adapter.

Why not Transformers' own continuous batching (generate_batch, ContinuousBatchingManager): its logits processors
are one chain for the whole batch, built from one GenerationConfig; only temperature, top-k and top-p vary per
request, and the processors see each row's last token instead of its sequence, so penalties, DRY, grammars,
mirostat, bans and logit bias cannot run per request; it draws from one generator and returns no top
log-probabilities. On this CPU it was also slower than one plain stream (docs/benchmarks.md).

How a step goes (one call of `step`, from the engine's thread):
- The rows already generating share one DynamicCache, left-padded to a common length: each row's tokens sit at
  the right end of the shared timeline, zeros (masked out) before them. Each row has its own positions, so its
  rotary embeddings are what they would be alone. They advance one token together in one forward.
- A new row reads its prompt in chunks of PROMPT_CHUNK tokens through a cache of its own (a batch of one, as the
  single-sequence loop does), one chunk a step, so the others keep generating; while rows generate, a step reads
  at most PROMPT_CHUNK prompt tokens in all. With its last chunk it picks its first token and its cache is merged
  into the shared one (whichever is shorter gets left padding).
- Each row's logits go through its own processor chain with its own token history, exactly as
  transformers_support.decode_loop does for one sequence; a row's draws come from its own generators.
- A row that ends (end-of-sequence token, max_new_tokens, nothing allowed next) or is removed leaves the cache
  (its row is selected out) and the padding every remaining row has is trimmed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loaders.batching import Adapter, BatchDecoder, SequenceRequest, StepOutput
from loaders.transformers_support import TokenEvents, accepts_keyword
from modules.errors import GenerationError, WorkbenchError
from modules.generation_params import GenerationParams

if TYPE_CHECKING:
    import torch

    from loaders.transformers_loader import TransformersModel
    from modules.samplers import SeededDraws

#: Prompt tokens one forward reads for a new row (and, while other rows generate, per step in all): bounds how
#: long the generating rows wait for a step while a long prompt is read.
PROMPT_CHUNK = 128


def unbatchable(model: Any) -> str | None:
    """Why this model's sequences cannot be batched by rows here, or None. The rows are merged and selected
    layer by layer in a DynamicCache; layers that keep other state (linear attention, shared or indexed KV)
    are not."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    try:
        cache = DynamicCache(config=model.config)
    except (TypeError, ValueError, AttributeError) as exc:
        return f"its cache cannot be made for a batch ({exc})"
    kinds = {type(layer) for layer in cache.layers}
    other = kinds - {DynamicLayer, DynamicSlidingWindowLayer}
    if other or not kinds:
        return f"its cache has layers of a kind the batch cannot merge ({', '.join(k.__name__ for k in other)})"
    return None


@dataclass(eq=False)
class _Row:
    """One sequence of the batch."""

    key: int
    request: SequenceRequest
    prompt: list[int]
    processors: Any  # its LogitsProcessorList
    events: TokenEvents
    sampling: bool  # draw from the processed distribution (else argmax)
    draws: SeededDraws | None
    adapter: str | None  # its PEFT adapter in a mixed batch; None: the model's applied set
    ids: torch.Tensor  # [1, n]: prompt and reply so far, which the processors read
    read: int = 0  # prompt tokens read so far
    cache: Any = None  # its own cache while it reads its prompt
    cached: int = 0  # its tokens in the cache (prompt and reply fed so far)
    last: torch.Tensor | None = None  # [1, 1]: the token to feed at the next step
    generated: int = 0
    error: BaseException | None = field(default=None, repr=False)

    @property
    def params(self) -> GenerationParams:
        return self.request.params


class TransformersBatch(BatchDecoder):
    """Up to `slots` sequences of one TransformersModel, decoded together."""

    def __init__(self, model: TransformersModel, slots: int):
        self.slots = slots
        self._model = model
        self._reading: list[_Row] = []  # reading their prompts, in arrival order
        self._rows: list[_Row] = []  # generating, in the order of the shared cache's batch dimension
        self._cache: Any = None  # the shared DynamicCache
        self._length = 0  # the shared timeline's length (the longest row's tokens)
        self._keep_one = accepts_keyword(model.model, "logits_to_keep")  # logits for the last position only

    # --- the seam ------------------------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._reading) + len(self._rows)

    def takes(self, params: GenerationParams) -> bool:
        from modules.samplers import only_generate

        return not only_generate(params)

    def accepts(self, adapters: tuple[Adapter, ...] | None) -> bool:
        """Rows with different adapters share a forward through PEFT's adapter_names, one adapter per row. The one
        case that cannot mix: several LoRAs applied to the whole model (no single name stands for them) beside
        rows that ask for adapters of their own."""
        if self._model.own_adapter() is not None:
            return True
        rows = self._reading + self._rows
        return not rows or (rows[0].request.adapters is None) == (adapters is None)

    def add(self, key: int, request: SequenceRequest) -> None:
        import torch

        from modules.samplers import SeededDraws, draws_token

        model, params = self._model, request.params
        prompt = request.prompt
        ids = model.encode(prompt, add_bos=params.add_bos_token) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise GenerationError("The prompt is empty: there is nothing to continue.")
        with model.lock:
            adapter = None if request.adapters is None else model.request_adapter(request.adapters)
        draws = SeededDraws(params.seed) if params.seed >= 0 else None
        processors, recorder = model.sampling_chain(params, len(ids), draws)
        device = self._device()
        self._reading.append(_Row(
            key=key, request=request, prompt=ids, processors=processors, events=model.token_events(params, recorder),
            sampling=draws_token(params), draws=draws, adapter=adapter,
            ids=torch.tensor([ids], dtype=torch.long, device=device)))

    def remove(self, key: int) -> None:
        self._reading = [row for row in self._reading if row.key != key]
        if any(row.key == key for row in self._rows):
            self._drop({key})

    def close(self) -> None:
        self._reading, self._rows, self._cache, self._length = [], [], None, 0

    def step(self) -> list[StepOutput]:
        import torch

        model = self._model
        with model.lock, torch.inference_mode():
            try:
                picked = self._decode() + self._read_prompts()
            except BaseException:  # the cache may be half-updated: every sequence ends (the engine tells them)
                self.close()
                raise
            tokens = self._pick(picked)
        outputs: list[StepOutput] = []
        ended: set[int] = set()
        joined: list[_Row] = []
        for (row, _), (token, allowed) in zip(picked, tokens):
            out, done = self._advance(row, token, allowed)
            outputs.append(out)
            if done:
                ended.add(row.key)
            elif row.cache is not None:
                joined.append(row)
        if ended & {row.key for row in self._rows}:
            self._drop(ended)
        for row in joined:
            self._merge(row)
        return outputs

    # --- one step --------------------------------------------------------------------------------------------------
    def _decode(self) -> list[tuple[_Row, torch.Tensor]]:
        """One token for every generating row, in one forward over the shared cache: each row's logits."""
        import torch

        rows = self._rows
        if not rows:
            return []
        device = self._device()
        input_ids = torch.cat([row.last for row in rows])
        positions = torch.tensor([[row.cached] for row in rows], device=device)
        pads = torch.tensor([self._length - row.cached for row in rows], device=device)
        mask = (torch.arange(self._length + 1, device=device)[None, :] >= pads[:, None]).long()
        out = self._forward(rows, input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            past_key_values=self._cache)
        self._cache = out.past_key_values
        self._length += 1
        for row in rows:
            row.cached += 1
        logits = out.logits[:, -1, :].float()
        return [(row, logits[index:index + 1]) for index, row in enumerate(rows)]

    def _read_prompts(self) -> list[tuple[_Row, torch.Tensor]]:
        """The next chunk of each reading row's prompt (within the step's budget while rows generate), through
        its own cache; the logits of those that finished reading."""
        import torch
        from transformers import DynamicCache

        budget = PROMPT_CHUNK if self._rows else None
        finished = []
        device = self._device()
        for row in list(self._reading):
            if budget is not None and budget <= 0:
                break
            size = PROMPT_CHUNK if budget is None else min(PROMPT_CHUNK, budget)
            chunk = row.prompt[row.read:row.read + size]
            if row.cache is None:
                row.cache = DynamicCache(config=self._model.model.config)
            out = self._forward([row], input_ids=torch.tensor([chunk], dtype=torch.long, device=device),
                                past_key_values=row.cache)
            row.cache = out.past_key_values
            row.read += len(chunk)
            row.cached += len(chunk)
            if budget is not None:
                budget -= len(chunk)
            if row.read == len(row.prompt):
                self._reading.remove(row)
                finished.append((row, out.logits[:, -1, :].float()))
        return finished

    def _forward(self, rows: list[_Row], **inputs: Any) -> Any:
        model = self._model
        if self._keep_one:
            inputs["logits_to_keep"] = 1
        names = [row.adapter for row in rows]
        if any(name is not None for name in names) and model.wrapped:
            own = model.own_adapter()  # not None here: accepts() keeps unnamed rows apart from named ones
            inputs["adapter_names"] = [own if name is None else name for name in names]
        return model.model(use_cache=True, **inputs)

    def _pick(self, picked: list[tuple[_Row, torch.Tensor]]) -> list[tuple[int, bool]]:
        """Each row's next token through its own processors and generator, and whether any token was allowed
        at all; a row whose processors fail ends alone (its error is kept). One device sync for all rows."""
        import torch

        chosen, allowed = [], []
        for row, logits in picked:
            try:
                scores = row.processors(row.ids, logits)
                finite = torch.isfinite(scores).any(dim=-1)
                if row.sampling:
                    safe = torch.where(finite[:, None], scores, torch.zeros_like(scores))  # never an invalid draw
                    generator = row.draws.on(scores.device) if row.draws is not None else None
                    token = torch.multinomial(torch.softmax(safe, dim=-1), num_samples=1, generator=generator)
                else:
                    token = scores.argmax(dim=-1, keepdim=True)
            except Exception as exc:  # this row's failure, told to its caller alone
                row.error = exc if isinstance(exc, WorkbenchError) else GenerationError(
                    f"Generation failed: {type(exc).__name__}: {exc}")
                token, finite = logits.new_zeros((1, 1), dtype=torch.long), logits.new_zeros(1, dtype=torch.bool)
            chosen.append(token.to(row.ids.device))
            allowed.append(finite)
        if not chosen:
            return []
        for (row, _), token in zip(picked, chosen):
            row.last = token
        return list(zip(torch.cat(chosen).view(-1).tolist(), torch.cat(allowed).tolist()))

    def _advance(self, row: _Row, token: int, allowed: bool) -> tuple[StepOutput, bool]:
        """What the step did for `row`, and whether it ended."""
        import torch

        if row.error is not None:
            return StepOutput(row.key, error=row.error), True
        if not allowed:  # nothing may come next (a grammar with no way on, everything banned): the reply ends
            return StepOutput(row.key, finished="stop"), True
        row.ids = torch.cat([row.ids, row.last], dim=-1)
        event = row.events.event(token)
        if event is None:
            return StepOutput(row.key, finished="stop"), True
        row.generated += 1
        if row.generated >= row.params.max_new_tokens:
            return StepOutput(row.key, event, finished="length"), True
        return StepOutput(row.key, event), False

    # --- the shared cache --------------------------------------------------------------------------------------
    def _merge(self, row: _Row) -> None:
        """Move a row that has read its prompt into the shared cache."""
        own, row.cache = row.cache, None
        if self._cache is None:
            self._cache, self._length, self._rows = own, row.cached, [row]
            return
        length = max(self._length, row.cached)
        for shared, mine in zip(self._cache.layers, own.layers):
            # Each layer holds the right end of the timeline (all of it, or a sliding window's worth).
            width = max(shared.keys.shape[-2], mine.keys.shape[-2])
            shared.keys = _cat_rows(shared.keys, mine.keys, width)
            shared.values = _cat_rows(shared.values, mine.values, width)
            if hasattr(shared, "cumulative_length"):
                shared.cumulative_length = length
        self._length = length
        self._rows.append(row)

    def _drop(self, keys: set[int]) -> None:
        """Take rows out of the shared cache, and the left padding all the others have."""
        import torch

        keep = [index for index, row in enumerate(self._rows) if row.key not in keys]
        if not keep:
            self._rows, self._cache, self._length = [], None, 0
            return
        self._rows = [self._rows[index] for index in keep]
        length = max(row.cached for row in self._rows)
        index = torch.tensor(keep, device=self._device())
        for layer in self._cache.layers:
            width = min(layer.keys.shape[-2], length)
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[..., -width:, :]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[..., -width:, :]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = length
        self._length = length

    def _device(self) -> Any:
        from loaders.transformers_loader import input_device

        return input_device(self._model.model)


def _cat_rows(shared: torch.Tensor, mine: torch.Tensor, width: int) -> torch.Tensor:
    """Two [rows, heads, length, dim] blocks stacked by rows, each left-padded with zeros to `width`."""
    import torch

    def padded(block: torch.Tensor) -> torch.Tensor:
        missing = width - block.shape[-2]
        if missing <= 0:
            return block
        zeros = block.new_zeros((*block.shape[:-2], missing, block.shape[-1]))
        return torch.cat([zeros, block], dim=-2)

    return torch.cat([padded(shared), padded(mine.to(shared.device))], dim=0)
