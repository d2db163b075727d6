"""EXL2 checkpoints through exllamav2, on CUDA GPUs only.

The model loads onto the GPUs named by `gpu_split` (GB per GPU) or, without it, split automatically while its cache
is allocated; the cache is FP16 or quantized (Q8, Q6, Q4). Requests run one at a time through exllamav2's dynamic
generator (paged when flash-attn 2.5.7 or later is installed, else its unpaged mode), sampled by its own sampler
(loaders.exllama_sampling says which knobs it honours). Without a CUDA GPU or without the package, loading raises
LoaderUnavailable before exllamav2 is imported (importing it builds its CUDA extension). Importing exllamav2 also
sets PyTorch's CPU threads to 1 for the whole process (its sampler works on small CPU tensors).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from loaders.exllama_common import ExllamaLoader, ExllamaModel, ExllamaOptions, cache_tokens
from loaders.exllama_sampling import EXLLAMAV2_PARAMS, exllamav2_plan
from modules.generation_params import GenerationParams


class Exllamav2Options(ExllamaOptions):
    alpha_value: float = Field(1.0, gt=0, description="NTK RoPE scaling (alpha) for a longer context; 1 = off.")
    compress_pos_emb: float = Field(1.0, gt=0, description=(
        "Linear RoPE scaling: positions are divided by this (2 doubles the context); 1 = off."))


class Exllamav2Model(ExllamaModel):
    loader_name = "exllamav2"
    library = "exllamav2"
    supported_params = EXLLAMAV2_PARAMS

    def _load(self, path: Path, options: Exllamav2Options) -> int:
        from exllamav2 import (
            ExLlamaV2,
            ExLlamaV2Cache,
            ExLlamaV2Cache_Q4,
            ExLlamaV2Cache_Q6,
            ExLlamaV2Cache_Q8,
            ExLlamaV2Config,
            ExLlamaV2Tokenizer,
            attn,
        )
        from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

        self._job_class, self._settings_class = ExLlamaV2DynamicJob, ExLlamaV2Sampler.Settings
        config = ExLlamaV2Config(str(path))
        if options.max_seq_len:
            config.max_seq_len = options.max_seq_len
        config.scale_pos_emb = options.compress_pos_emb
        config.scale_alpha_value = options.alpha_value
        config.arch_compat_overrides(quiet=True)
        # The paged cache needs flash-attn's paged kernel; without it the generator runs unpaged (one job).
        self.paged = bool(attn.has_flash_attn_with_paged) and not config.no_flash_attn
        self.cache_tokens = cache_tokens(options, config.max_seq_len)
        cache_class = {"fp16": ExLlamaV2Cache, "q8": ExLlamaV2Cache_Q8, "q6": ExLlamaV2Cache_Q6,
                       "q4": ExLlamaV2Cache_Q4}[options.cache_quant]
        self._model = ExLlamaV2(config)
        if options.gpu_split:
            self._model.load(gpu_split=list(options.gpu_split))
            self._cache = cache_class(self._model, max_seq_len=self.cache_tokens)
        else:  # auto split: layers and their cache fill each GPU in turn
            self._cache = cache_class(self._model, max_seq_len=self.cache_tokens, lazy=True)
            self._model.load_autosplit(self._cache)
        self._exl_tokenizer = ExLlamaV2Tokenizer(config)
        self._generator = ExLlamaV2DynamicGenerator(model=self._model, cache=self._cache,
                                                    tokenizer=self._exl_tokenizer, paged=self.paged)
        self._vocab = int(config.vocab_size)
        self._breakers: dict[tuple[str, ...], set[int]] = {}
        return min(config.max_seq_len, self.cache_tokens)

    def _vocab_size(self) -> int:
        return self._vocab

    def _job(self, ids: Any, params: GenerationParams) -> Any:
        plan = exllamav2_plan(params, self._eos_ids)
        settings = self._settings_class(**plan.settings)
        if plan.bias:
            torch = self._torch
            width = -(-self._vocab // 32) * 32  # the generator's logits are padded to a multiple of 32
            bias = torch.zeros((width,), dtype=torch.float)
            for token, value in plan.bias.items():
                if 0 <= token < width:
                    bias[token] = value
            settings.token_bias = bias
        if plan.dry_breakers:
            settings.dry_sequence_breakers = self._breaker_ids(plan.dry_breakers)
        return self._job_class(
            input_ids=ids, max_new_tokens=params.max_new_tokens, gen_settings=settings,
            seed=params.seed if params.seed >= 0 else None, stop_conditions=self._stop_tokens(params),
            decode_special_tokens=not params.skip_special_tokens,
            banned_strings=list(params.banned_strings) or None)

    def _breaker_ids(self, breakers: tuple[str, ...]) -> set[int]:
        """The tokens whose text holds a DRY sequence breaker (exllamav2 takes breakers as token ids)."""
        if breakers not in self._breakers:
            pieces = self._exl_tokenizer.get_id_to_piece_list(True)
            self._breakers[breakers] = {token for token, piece in enumerate(pieces)
                                        if any(breaker in piece for breaker in breakers)}
        return self._breakers[breakers]

    def _free(self) -> None:
        model = getattr(self, "_model", None)
        self._generator = self._cache = self._model = None
        if model is not None:
            model.unload()


class Exllamav2Loader(ExllamaLoader):
    name = "exllamav2"
    Options = Exllamav2Options
    Model = Exllamav2Model
    format = "exl2"
    description = "EXL2 folders through exllamav2 (CUDA GPUs only)."
