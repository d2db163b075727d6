"""GET /v1/models(/{id}), text-generation-webui's /v1/internal/* routes and the seeds' POST /predict."""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from extensions.openai.completions import ERRORS, api_state, first_chunk, start_run
from extensions.openai.embeddings import router as embeddings_router
from extensions.openai.errors import ApiError, api_error_from
from extensions.openai.mapping import check_token_ids, model_names_of
from extensions.openai.protocol import (DecodeRequest, DecodeResponse, EncodeRequest, EncodeResponse, HealthResponse,
                                        LoadModelRequest, LoadModelResponse, LoraLoadRequest, ModelCard,
                                        ModelInfoResponse, ModelList, ModelNamesResponse, PredictRequest,
                                        PredictResponse, StatusResponse, TokenCountRequest, TokenCountResponse)
from modules.errors import WorkbenchError
from modules.generation_params import GenerationParams

router = APIRouter(responses=ERRORS)
#: Longest text /encode and /token-count take: more tokens than any context holds; tokenizing more would hold a
#: worker thread for many seconds.
MAX_TOKENIZE_CHARS = 2 * 2**20
router.include_router(embeddings_router)

#: The prompt format of the instruction data the seeds train on (Alpaca).
ALPACA_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.")


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    prompt = f"{ALPACA_HEAD}\n\n### Instruction:\n{instruction}"
    if input_text.strip():
        prompt += f"\n\n### Input:\n{input_text}"
    return prompt + "\n\n### Response:\n"


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
    names = manager.list_models()
    info = manager.info()
    if info is not None and not (model_names_of(manager) & set(names)):
        names = [info.name, *names]  # a remote model is not in models/
    cards = []
    for name in names:
        path = manager.model_dir / name
        created = int(path.stat().st_mtime) if path.exists() else 0
        cards.append(ModelCard(id=name, created=created))
    return cards


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=await run_in_threadpool(_model_cards, _manager(request)))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    manager = _manager(request)
    cards = await run_in_threadpool(_model_cards, manager)
    if cards and model_id in model_names_of(manager):
        return cards[0]  # the loaded model, under any of its names
    for card in cards:
        if card.id == model_id:
            return card
    raise ApiError(404, f"The model {model_id!r} does not exist.", param="model", code="model_not_found")


# --- internal ----------------------------------------------------------------------------------------------------
@router.get("/v1/internal/model/info", response_model=ModelInfoResponse)
async def model_info(request: Request) -> ModelInfoResponse:
    manager = _manager(request)
    model = manager.model
    if model is None:
        return ModelInfoResponse(model_name=None)
    info = model.info()
    return ModelInfoResponse(model_name=info.name, lora_names=info.loras, loader=info.loader,
                             context_length=info.context_length, capabilities=list(info.capabilities),
                             supported_params=sorted(model.supported_params), chat_template=model.chat_template,
                             bos_token=model.bos_token, eos_token=model.eos_token)


@router.get("/v1/internal/model/list", response_model=ModelNamesResponse)
async def model_list(request: Request) -> ModelNamesResponse:
    return ModelNamesResponse(model_names=await run_in_threadpool(_manager(request).list_models))


@router.post("/v1/internal/model/load", response_model=LoadModelResponse)
async def model_load(body: LoadModelRequest, request: Request) -> LoadModelResponse:
    manager = _manager(request)
    result = await run_in_threadpool(_call, manager.load, body.model_name, body.loader, body.args,
                                     param="model_name", cancel_running=True)
    return LoadModelResponse(model_name=result.info.name, loader=result.info.loader, seconds=round(result.seconds, 3),
                             warnings=result.warnings)


@router.post("/v1/internal/model/unload", response_model=StatusResponse)
async def model_unload(request: Request) -> StatusResponse:
    await run_in_threadpool(_call, _manager(request).unload, cancel_running=True)
    return StatusResponse(status="ok")


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
    tokens = await run_in_threadpool(_call, _manager(request).encode, body.text, add_bos=body.add_bos, param="text")
    return EncodeResponse(tokens=tokens, length=len(tokens))


@router.post("/v1/internal/decode", response_model=DecodeResponse)
async def decode(body: DecodeRequest, request: Request) -> DecodeResponse:
    manager = _manager(request)
    return DecodeResponse(text=await run_in_threadpool(_call, _checked_decode, manager, body.tokens, param="tokens"))


def _checked_decode(manager: Any, tokens: list[int]) -> str:
    check_token_ids(manager, tokens, "tokens")
    return manager.decode(tokens)


@router.post("/v1/internal/token-count", response_model=TokenCountResponse)
async def token_count(body: TokenCountRequest, request: Request) -> TokenCountResponse:
    _check_tokenizable(body.text)
    return TokenCountResponse(length=await run_in_threadpool(_call, _manager(request).token_count, body.text,
                                                             param="text"))


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
@router.post("/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, request: Request) -> PredictResponse:
    services = api_state(request).services
    services.manager.require_model()
    params = GenerationParams(temperature=body.temperature, do_sample=body.temperature > 0,
                              max_new_tokens=body.max_new_tokens, stop=["\n### ", "### Instruction:"])
    run = await start_run(services, request, alpaca_prompt(body.instruction, body.input), params)
    try:
        await first_chunk(run)
        text = await run.collect()
    except WorkbenchError as exc:
        raise api_error_from(exc) from None
    return PredictResponse(answer=text.strip())
