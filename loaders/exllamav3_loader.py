"""EXL3 checkpoints through exllamav3, on CUDA GPUs only.

The model loads onto the GPUs named by `gpu_split` (GB per GPU) or, without it, split automatically; the cache is
FP16 or quantized to 8, 6 or 4 bits for keys and values alike. Requests run one at a time through exllamav3's
generator, sampled by a list of its sampler steps built from the request (loaders.exllama_sampling). Without a
CUDA GPU or without the package, loading raises LoaderUnavailable before exllamav3 is imported (importing it builds
its CUDA extension).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from loaders.exllama_common import ExllamaLoader, ExllamaModel, ExllamaOptions, cache_tokens
from loaders.exllama_sampling import EXLLAMAV3_PARAMS, exllamav3_plan
from modules.generation_params import GenerationParams

_CACHE_BITS = {"q8": 8, "q6": 6, "q4": 4}


class Exllamav3Options(ExllamaOptions):
    """The options both exllama loaders share; exllamav3 reads the RoPE settings from the model."""


class Exllamav3Model(ExllamaModel):
    loader_name = "exllamav3"
    library = "exllamav3"
    supported_params = EXLLAMAV3_PARAMS

    def _load(self, path: Path, options: Exllamav3Options) -> int:
        from exllamav3 import Cache, Config, Generator, Job, Model, Tokenizer
        from exllamav3.cache import CacheLayer_fp16, CacheLayer_quant
        from exllamav3.generator import sampler

        self._job_class, self._sampler = Job, sampler
        config = Config.from_directory(str(path))
        context = options.max_seq_len or int(config.max_position_embeddings)
        self.cache_tokens = cache_tokens(options, context)
        self._model = Model.from_config(config)
        if options.cache_quant == "fp16":
            self._cache = Cache(self._model, max_num_tokens=self.cache_tokens, layer_type=CacheLayer_fp16)
        else:
            bits = _CACHE_BITS[options.cache_quant]
            self._cache = Cache(self._model, max_num_tokens=self.cache_tokens, layer_type=CacheLayer_quant,
                                k_bits=bits, v_bits=bits)
        if options.gpu_split:  # the GPUs with 0 (or left out) are not used
            self._model.load(use_per_device=list(options.gpu_split))
        else:
            self._model.load()
        self._exl_tokenizer = Tokenizer.from_config(config)
        self._generator = Generator(model=self._model, cache=self._cache, tokenizer=self._exl_tokenizer)
        self._vocab = int(config.vocab_size or len(self.tokenizer))
        return min(context, self.cache_tokens)

    def _vocab_size(self) -> int:
        return self._vocab

    def _job(self, ids: Any, params: GenerationParams) -> Any:
        plan = exllamav3_plan(params, self._eos_ids)
        steps = []
        for name, kwargs in plan.steps:
            if name == "SS_DRY":
                kwargs = {**kwargs, "dry_sequence_breakers": self._sampler.dry_sequence_breaker_tokens(
                    self._exl_tokenizer, plan.dry_breakers)}
            elif name == "SS_XTC":
                kwargs = {**kwargs, "tokenizer": self._exl_tokenizer}  # its default protected tokens
            steps.append(getattr(self._sampler, name)(**kwargs))
        return self._job_class(
            input_ids=ids, max_new_tokens=params.max_new_tokens, sampler=self._sampler.CustomSampler(steps),
            seed=params.seed if params.seed >= 0 else None, stop_conditions=self._stop_tokens(params),
            decode_special_tokens=not params.skip_special_tokens,
            banned_strings=list(params.banned_strings) or None)

    def _free(self) -> None:
        generator, model = self._generator, getattr(self, "_model", None)
        self._generator = self._cache = self._model = None
        if generator is not None:
            generator.close()
        if model is not None:
            model.unload()


class Exllamav3Loader(ExllamaLoader):
    name = "exllamav3"
    Options = Exllamav3Options
    Model = Exllamav3Model
    format = "exl3"
    description = "EXL3 folders through exllamav3 (CUDA GPUs only)."
