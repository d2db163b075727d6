"""Raw completion for the Default and Notebook tabs: prompt text -> ModelManager (the model and LoRAs the page
picked, see modules.ui.model_choice) -> streamed text, with the tokens and their probabilities when the loader
reports them. Nothing here imports Gradio."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from loaders.base import Capability
from modules.errors import ConfigError
from modules.generation_params import GenerationParams, TokenEvent
from modules.request_hooks import RequestHooks
from modules.services import Services
from modules.ui.access import may_administer
from modules.ui.model_choice import ModelChoice, find_resident, page_client
from modules.ui.session_state import UiSession
from modules.ui.streaming import stream_batches

#: Alternatives reported per token in the token view when the parameters ask for none.
VIEW_LOGPROBS = 5


@dataclass
class CompletionUpdate:
    text: str  # the generated text so far (without the prompt)
    status: str
    tokens: list[TokenEvent] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    done: bool = False


def run_completion(services: Services, session: UiSession, prompt: str, params: GenerationParams, *,
                   with_probabilities: bool = True, choice: ModelChoice | None = None
                   ) -> Iterator[CompletionUpdate]:
    """Stream the model's continuation of `prompt`, by the model `choice` names (loaded first when it is not
    resident and the page may load models)."""
    if session.busy:
        raise ConfigError("A generation is still running on this page: wait for it or press Stop.")
    manager, choice = services.manager, choice or ModelChoice()
    resident = find_resident(manager, choice.model, may_load=may_administer(services.settings, session.user))
    adapters = choice.adapters(manager)
    if resident is None:
        yield CompletionUpdate("", f"Loading {choice.model}…")
        resident = manager.ensure(str(choice.model))
    model, name = resident.model, resident.name
    hooks = RequestHooks(services, params)  # state_modifier and input_modifier; output_modifier is for chats
    params, prompt = hooks.params, hooks.prompt_text(prompt)
    if with_probabilities and Capability.LOGPROBS in model.capabilities and not params.logprobs:
        params = params.model_copy(update={"logprobs": VIEW_LOGPROBS})
    generation = manager.generate(prompt, params, model=name, adapters=adapters, client=page_client(session))
    who = f"Model: {choice.describe(name)} · "
    session.generation = generation
    text, tokens, warnings = "", [], list(generation.warnings)
    try:
        for batch in stream_batches(generation):
            for chunk in batch:
                text += chunk.text
                tokens.extend(chunk.tokens)
            prompt_tokens = generation.stats.prompt_tokens
            yield CompletionUpdate(text, who + (f"Prompt: {prompt_tokens} tokens · writing…" if prompt_tokens else
                                                "writing…"), tokens, warnings=warnings)
            warnings = []
    finally:
        generation.cancel()  # no-op once it ended; stops it when the page went away
        session.generation = None
    stats = generation.stats
    ending = {"cancelled": " · stopped", "length": " · hit max_new_tokens"}.get(stats.finish_reason, "")
    status = (f"{who}Prompt: {stats.prompt_tokens} of {model.context_length} tokens · output: "
              f"{stats.completion_tokens} tokens in {stats.seconds:.1f} s ({stats.tokens_per_second:.1f} tokens/s){ending}")
    yield CompletionUpdate(text, status, tokens, done=True)


def token_heat(tokens: list[TokenEvent]) -> list[tuple[str, float | None]]:
    """(token text, probability) pairs: the output coloured by how sure the model was."""
    return [(t.text, round(math.exp(t.logprob), 3) if t.logprob is not None else None) for t in tokens]


def token_rows(tokens: list[TokenEvent]) -> list[list[object]]:
    """One row per token: position, text, probability, and the top alternatives with theirs."""
    rows = []
    for number, token in enumerate(tokens, 1):
        probability = f"{math.exp(token.logprob):.3f}" if token.logprob is not None else "—"
        alternatives = ", ".join(f"{top.token!r} {math.exp(top.logprob):.3f}" for top in token.top_logprobs)
        rows.append([number, repr(token.text), probability, alternatives])
    return rows
