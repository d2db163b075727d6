"""The sampling layer of the Transformers loader: GenerationParams -> logits processors + generate() kwargs."""
from modules.samplers.chain import (
    TRANSFORMERS_SUPPORTED_PARAMS,
    build_logits_processors,
    draws_token,
    generate_kwargs,
    only_generate,
    sampler_order,
)
from modules.samplers.draws import SeededDraws

__all__ = ["TRANSFORMERS_SUPPORTED_PARAMS", "SeededDraws", "build_logits_processors", "draws_token",
           "generate_kwargs", "only_generate", "sampler_order"]
