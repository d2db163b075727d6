"""The sampling layer of the Transformers loader: GenerationParams -> logits processors + generate() kwargs."""
from modules.samplers.chain import (
    TRANSFORMERS_SUPPORTED_PARAMS,
    build_logits_processors,
    generate_kwargs,
    sampler_order,
)

__all__ = ["TRANSFORMERS_SUPPORTED_PARAMS", "build_logits_processors", "generate_kwargs", "sampler_order"]
