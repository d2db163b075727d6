"""text-generation-webui's internal routes (/v1/internal/*) and the seeds' POST /predict as pydantic models."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from extensions.openai.protocol import StrictModel


# --- internal routes (text-generation-webui's) ------------------------------------------------------------------
class ModelInfoResponse(BaseModel):
    model_name: str | None
    lora_names: list[str] = Field(default_factory=list)
    loader: str | None = None
    context_length: int | None = None
    capabilities: list[str] = Field(default_factory=list)
    supported_params: list[str] = Field(default_factory=list)
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None


class ModelNamesResponse(BaseModel):
    model_names: list[str]


class LoraNamesResponse(BaseModel):
    lora_names: list[str] = Field(description="LoRAs in loras/; a request's `lora` may name one by its place "
                                              "here (llama.cpp's `id`).")


class ResidentModel(BaseModel):
    """A model in memory and what it is doing."""

    name: str
    default: bool = Field(description="Requests that name no model get this one.")
    loader: str
    context_length: int
    memory_bytes: int
    loras: list[str]
    slots: int = Field(description="Requests it decodes at once.")
    slots_busy: int
    queued: int = Field(description="Requests waiting for a slot.")
    max_queue: int = Field(description="Most requests that may wait (0: no limit); beyond it 503 overloaded.")
    loaded_seconds_ago: float
    idle_seconds: float | None = Field(description="Seconds since its last request ended; None while in use.")
    unloads_in_seconds: float | None = Field(
        description="When idle, seconds until it is unloaded (keep_alive or --idle-unload); None: it stays.")


class ResidentModelsResponse(BaseModel):
    models: list[ResidentModel] = Field(description="Most recently used first.")
    max_models: int = Field(description="Most models resident at once (0: no limit).")
    memory_budget_bytes: int = Field(description="Memory the resident models may use (0: no limit).")
    loading: str | None = Field(None, description="A model being loaded now.")


class UnloadModelRequest(StrictModel):
    model_name: str | None = Field(None, min_length=1, description="The model to unload; empty = the default one.")


class LoadModelRequest(StrictModel):
    model_name: str = Field(min_length=1)
    loader: str | None = None
    args: dict[str, Any] = Field(default_factory=dict, description="Loader options, e.g. {\"n_ctx\": 4096}.")


class LoadModelResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model_name: str
    loader: str
    seconds: float
    warnings: list[str] = Field(default_factory=list)


class LoraLoadRequest(StrictModel):
    lora_names: list[str]
    lora_scales: list[float] | None = None


class EncodeRequest(StrictModel):
    text: str
    add_bos: bool = False
    model: str | None = Field(None, description="A resident model; empty = the default one.")


class EncodeResponse(BaseModel):
    tokens: list[int]
    length: int


class DecodeRequest(StrictModel):
    tokens: list[Annotated[int, Field(ge=0, lt=2**31)]]
    model: str | None = Field(None, description="A resident model; empty = the default one.")


class DecodeResponse(BaseModel):
    text: str


class TokenCountRequest(StrictModel):
    text: str
    model: str | None = Field(None, description="A resident model; empty = the default one.")


class TokenCountResponse(BaseModel):
    length: int


class StatusResponse(BaseModel):
    status: str


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "no_model"] = "ok"
    model_loaded: bool
    loading_model: str | None = Field(None, description="While status is 'loading': the model being loaded.")
    loading_seconds: float | None = Field(None, description="While status is 'loading': seconds so far.")


# --- /predict (the seeds' instruction endpoint) -----------------------------------------------------------------
class PredictRequest(StrictModel):
    instruction: str = Field(min_length=1)
    input: str = ""
    temperature: float = Field(0.0, ge=0, le=2)
    max_new_tokens: int = Field(256, ge=1, le=4096)


class PredictResponse(BaseModel):
    answer: str
