"""GET /v1/models(/{id}), text-generation-webui's /v1/internal/* routes and the seeds' POST /predict."""
from __future__ import annotations

import math
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from extensions.openai.completions import ERRORS, api_state, first_chunk, start_run
from extensions.openai.embeddings import router as embeddings_router
from extensions.openai.errors import ApiError, api_error_from
from extensions.openai.mapping import check_token_ids
from extensions.openai.protocol import ModelCard, ModelList
from extensions.openai.protocol_internal import (DecodeRequest, DecodeResponse, EncodeRequest, EncodeResponse,
                                                 HealthResponse, LoadModelRequest, LoadModelResponse, LoraLoadRequest,
                                                 LoraNamesResponse, ModelInfoResponse, ModelNamesResponse,
                                                 PredictRequest, PredictResponse, ResidentModel,
                                                 ResidentModelsResponse, StatusResponse, TokenCountRequest,
                                                 TokenCountResponse, UnloadModelRequest)
from extensions.openai.target import resolve_target
from modules.chat.request import ChatRequest, finish_reply, prepare_chat
from modules.errors import WorkbenchError
from modules.generation_params import GenerationParams
from modules.model_manager import names_of

router = APIRouter(responses=ERRORS)
#: Longest text /encode and /token-count take: more tokens than any context holds; tokenizing more would hold a
#: worker thread for many seconds.
MAX_TOKENIZE_CHARS = 2 * 2**20
router.include_router(embeddings_router)

def _manager(request: Request) -> Any:
    return api_state(request).services.manager


def _call(function: Any, *args: Any, param: str | None = None, **kwargs: Any) -> Any:
    """Run a ModelManager call, turning its errors into API errors about `param` (by their kind: a name that
    names nothing is a 404, a bad one a 400)."""
    try:
        return function(*args, **kwargs)
    except WorkbenchError as exc:
        raise api_error_from(exc, param) from None


# --- models ------------------------------------------------------------------------------------------------------
def _model_cards(manager: Any) -> list[ModelCard]:
    """Resident models first (the default one, then by recent use), then the rest of models/; a resident model
    that is not in models/ (a remote one) is listed under its own name."""
    residents = manager.pool.all()
    default = manager.resident()
    residents.sort(key=lambda r: r is not default)
    cards = [_card(manager, r.name if (manager.model_dir / r.name).exists() else r.model.name, True)
             for r in residents]
    listed = {card.id for card in cards}
    cards += [_card(manager, name, False) for name in manager.list_models() if name not in listed]
    return cards


def _card(manager: Any, name: str, resident: bool) -> ModelCard:
    path = manager.model_dir / name
    return ModelCard(id=name, created=int(path.stat().st_mtime) if path.exists() else 0, resident=resident)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=await run_in_threadpool(_model_cards, _manager(request)))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    manager = _manager(request)
    cards = await run_in_threadpool(_model_cards, manager)
    resident = manager.resident(model_id)
    for card in cards:
        if card.id == model_id or (resident is not None and card.resident and card.id in
                                   names_of(resident, manager.model_dir)):
            return card
    raise ApiError(404, f"The model {model_id!r} does not exist.", param="model", code="model_not_found")


# --- internal ----------------------------------------------------------------------------------------------------
@router.get("/v1/internal/model/info", response_model=ModelInfoResponse)
async def model_info(request: Request, model: str | None = None) -> ModelInfoResponse:
    """The default model, or the resident model `?model=NAME`."""
    manager = _manager(request)
    resident = manager.resident(model or None)
    if resident is None:
        if model:
            raise ApiError(404, f"The model {model[:200]!r} is not loaded; /v1/internal/models lists the loaded "
                                "ones.", param="model", code="model_not_found")
        return ModelInfoResponse(model_name=None)
    loaded = resident.model
    info = loaded.info()
    return ModelInfoResponse(model_name=info.name, lora_names=info.loras, loader=info.loader,
                             context_length=info.context_length, capabilities=list(info.capabilities),
                             supported_params=sorted(loaded.supported_params), chat_template=loaded.chat_template,
                             bos_token=loaded.bos_token, eos_token=loaded.eos_token)


@router.get("/v1/internal/model/list", response_model=ModelNamesResponse)
async def model_list(request: Request) -> ModelNamesResponse:
    return ModelNamesResponse(model_names=await run_in_threadpool(_manager(request).list_models))


@router.get("/v1/internal/models", response_model=ResidentModelsResponse)
async def resident_models(request: Request) -> ResidentModelsResponse:
    """The models in memory, with their slots, queue and memory, and the pool's limits."""
    return await run_in_threadpool(_residents, _manager(request))


def _residents(manager: Any) -> ResidentModelsResponse:
    pool, default = manager.pool, manager.resident()
    now, wall = time.monotonic(), time.time()
    models = []
    for resident in pool.all():
        engine, info = resident.engine, resident.model.info()
        idle = resident.idle
        deadline = resident.keep_until if resident.keep_until is not None else (
            resident.last_used + pool.idle_unload if pool.idle_unload else math.inf)
        models.append(ResidentModel(
            name=resident.name, default=resident is default, loader=info.loader, context_length=info.context_length,
            memory_bytes=info.memory_bytes, loras=info.loras, slots=engine.slots, slots_busy=engine.busy_slots,
            queued=engine.waiting, max_queue=engine.max_queue, loaded_seconds_ago=round(wall - resident.loaded_at, 1),
            idle_seconds=round(now - resident.last_used, 1) if idle else None,
            unloads_in_seconds=round(max(0.0, deadline - now), 1) if idle and deadline != math.inf else None))
    loading = pool.loading
    return ResidentModelsResponse(models=models, max_models=pool.max_models, memory_budget_bytes=pool.memory_budget,
                                  loading=loading.name if loading is not None else None)


@router.post("/v1/internal/model/load", response_model=LoadModelResponse)
async def model_load(body: LoadModelRequest, request: Request) -> LoadModelResponse:
    """Load a model (again, with these settings, when it is resident) and make it the default one; the other
    resident models stay, as far as --max-models and --memory-budget allow (the least recently used go first)."""
    manager = _manager(request)
    result = await run_in_threadpool(_call, manager.load, body.model_name, body.loader, body.args,
                                     param="model_name", cancel_running=True)
    return LoadModelResponse(model_name=result.info.name, loader=result.info.loader, seconds=round(result.seconds, 3),
                             warnings=result.warnings)


@router.post("/v1/internal/model/unload", response_model=StatusResponse)
async def model_unload(request: Request, body: UnloadModelRequest | None = None) -> StatusResponse:
    """Unload `model_name` (default: the default model), cancelling its requests."""
    manager = _manager(request)
    name = body.model_name if body is not None else None
    if name is not None and manager.resident(name) is None:
        raise ApiError(404, f"The model {name[:200]!r} is not loaded; /v1/internal/models lists the loaded ones.",
                       param="model_name", code="model_not_found")
    await run_in_threadpool(_call, manager.unload, name, cancel_running=True)
    return StatusResponse(status="ok")


@router.get("/v1/internal/lora/list", response_model=LoraNamesResponse)
async def lora_list(request: Request) -> LoraNamesResponse:
    return LoraNamesResponse(lora_names=await run_in_threadpool(_manager(request).list_loras))


@router.post("/v1/internal/lora/load", response_model=ModelInfoResponse)
async def lora_load(body: LoraLoadRequest, request: Request) -> ModelInfoResponse:
    if body.lora_scales is not None and len(body.lora_scales) != len(body.lora_names):
        raise ApiError(400, "lora_scales needs one scale per LoRA name.", param="lora_scales")
    manager = _manager(request)
    await run_in_threadpool(_call, manager.apply_loras, body.lora_names, body.lora_scales, param="lora_names")
    return await model_info(request)


def _check_tokenizable(text: str) -> None:
    if len(text) > MAX_TOKENIZE_CHARS:
        raise ApiError(400, f"The text has {len(text)} characters; the tokenizer routes take at most "
                            f"{MAX_TOKENIZE_CHARS} (more tokens than any context holds).", param="text")


@router.post("/v1/internal/encode", response_model=EncodeResponse)
async def encode(body: EncodeRequest, request: Request) -> EncodeResponse:
    _check_tokenizable(body.text)
    model = (await resolve_target(request, body)).model
    tokens = await run_in_threadpool(_call, _manager(request).encode, body.text, add_bos=body.add_bos, model=model,
                                     param="text")
    return EncodeResponse(tokens=tokens, length=len(tokens))


@router.post("/v1/internal/decode", response_model=DecodeResponse)
async def decode(body: DecodeRequest, request: Request) -> DecodeResponse:
    manager = _manager(request)
    model = (await resolve_target(request, body)).model
    return DecodeResponse(text=await run_in_threadpool(_call, _checked_decode, manager, body.tokens, model,
                                                       param="tokens"))


def _checked_decode(manager: Any, tokens: list[int], model: str) -> str:
    check_token_ids(manager, tokens, "tokens", model)
    return manager.decode(tokens, model=model)


@router.post("/v1/internal/token-count", response_model=TokenCountResponse)
async def token_count(body: TokenCountRequest, request: Request) -> TokenCountResponse:
    _check_tokenizable(body.text)
    model = (await resolve_target(request, body)).model
    return TokenCountResponse(length=await run_in_threadpool(_call, _manager(request).token_count, body.text,
                                                             model=model, param="text"))


@router.post("/v1/internal/stop-generation", response_model=StatusResponse)
async def stop_generation(request: Request) -> StatusResponse:
    _manager(request).stop_all()
    return StatusResponse(status="ok")


@router.get("/v1/internal/health", response_model=HealthResponse, response_model_exclude_none=True)
async def health(request: Request) -> HealthResponse:
    """Answered at once, whatever the model is doing: "ok" (a model is loaded), "loading" (one is being loaded,
    named with the seconds so far) or "no_model"."""
    manager = _manager(request)
    loaded = manager.model is not None
    loading = manager.loading
    if loaded:
        return HealthResponse(status="ok", model_loaded=True)
    if loading is not None:
        return HealthResponse(status="loading", model_loaded=False, loading_model=loading.name,
                              loading_seconds=round(time.time() - loading.since, 1))
    return HealthResponse(status="no_model", model_loaded=False)


# --- the seeds' instruction endpoint ------------------------------------------------------------------------------
def predict_request(services: Any, body: PredictRequest, model: str | None = None) -> ChatRequest:
    """A /predict body as a chat request in the Alpaca layout, which training writes the instruction data in:
    the same formatter (modules.training.formatting) makes the prompt, so an Alpaca-trained LoRA is asked the way
    it was trained. Neutral sampling, not the server's preset: the seeds' endpoint asks for exactly this."""
    params = GenerationParams(temperature=body.temperature, do_sample=body.temperature > 0,
                              max_new_tokens=body.max_new_tokens)
    return ChatRequest(messages=[{"role": "user", "content": body.instruction, "input": body.input}],
                       chat=services.chat_settings(model), params=params, model=model, prompt_format="alpaca",
                       fit="refuse", new_user_message=True, source="api")


@router.post("/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, request: Request) -> PredictResponse:
    services = api_state(request).services
    target = await resolve_target(request)
    try:
        prepared = await run_in_threadpool(prepare_chat, services, predict_request(services, body, target.model))
    except WorkbenchError as exc:
        raise api_error_from(exc, "instruction") from None
    run = await start_run(services, request, prepared.prompt, prepared.params, prepared.add_bos, target=target)
    try:
        await first_chunk(run)
        text = await run.collect()
    except WorkbenchError as exc:
        raise api_error_from(exc) from None
    return PredictResponse(answer=finish_reply(prepared, text, run.tokens).shown.strip())
