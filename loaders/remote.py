"""A loader for remote engines: any OpenAI-compatible server (vLLM, TGI, llama.cpp's server, llama-cpp-python's
server, another workbench) driven through its /v1/completions endpoint with streaming.

The prompt is still built here (modules.chat, with the remote's chat template where the server tells it), and stop
strings still pass through the core's filter. What the server honours is declared per kind of server, found at
load time:
- another workbench (it answers /v1/internal/model/info): every knob its own loader honours, token ids through
  /v1/internal/encode and /decode, its model's chat template;
- llama.cpp's server (it answers /props): its native samplers, token ids through /tokenize and /detokenize;
- llama-cpp-python's server (it answers /extras/tokenize): its samplers and GBNF grammars; encode/decode through
  /extras/tokenize, but prompts travel as text (its completions take no token arrays);
- any other OpenAI-compatible server: only OpenAI's knobs, text prompts, no tokenizer.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from loaders.base import Capability, LoadedModel, Loader, LoaderOptions, ModelInfo
from modules.errors import GenerationError, InvalidInput, ModelLoadError
from modules.constraints import TrialCompiler
from modules.generation_params import GenerationParams, TokenEvent, TopLogprob

_OPENAI_KNOBS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "logit_bias"})
#: llama-cpp-python's server: CreateCompletionRequest's sampling fields.
_LLAMA_CPP_PYTHON_KNOBS = _OPENAI_KNOBS | {"top_k", "min_p", "repetition_penalty", "mirostat_mode", "mirostat_tau",
                                          "mirostat_eta", "grammar_string", "json_schema"}
#: llama.cpp's C++ server: its /completion sampling fields under their OpenAI-endpoint names.
_LLAMA_CPP_KNOBS = _OPENAI_KNOBS | {"top_k", "min_p", "typical_p", "repetition_penalty", "repetition_penalty_range",
                                    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_sequence_breakers",
                                    "xtc_threshold", "xtc_probability", "mirostat_mode", "mirostat_tau", "mirostat_eta",
                                    "top_n_sigma", "dynatemp_low", "dynatemp_high", "dynatemp_exponent",
                                    "dynamic_temperature", "grammar_string", "json_schema", "ban_eos_token"}
_DEFAULT_CONTEXT = 4096


class RemoteOptions(LoaderOptions):
    remote_url: str = Field("", description="Base URL of an OpenAI-compatible server, e.g. http://host:8000/v1.")
    remote_model: str = Field("", description="Model name on the server; empty = the --model name if the server "
                                              "has it, else the server's first model.")
    remote_api_key: str | None = Field(None, description="Bearer key for the remote server.")
    remote_timeout: float = Field(600.0, gt=0, description="Seconds to wait for the server between tokens.")
    remote_context_length: int = Field(0, ge=0, description="Context length; 0 = ask the server (else 4096).")

    @field_validator("remote_url")
    @classmethod
    def _http(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("remote_url must start with http:// or https://")
        return value


class RemoteLoader(Loader):
    name = "remote"
    Options = RemoteOptions
    description = "A remote OpenAI-compatible server (vLLM, TGI, llama.cpp server, another workbench)."
    local_files = False  # the model name is the server's, not a file in models/

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return False  # only when asked for by name

    @classmethod
    def load(cls, path: Path, options: LoaderOptions) -> "RemoteModel":
        assert isinstance(options, RemoteOptions)
        if not options.remote_url:
            raise ModelLoadError("The remote loader needs --remote-url (the server's base URL, e.g. "
                                 "http://127.0.0.1:8000/v1).")
        return RemoteModel(str(path), options)


class RemoteModel(LoadedModel):
    loader_name = "remote"

    def __init__(self, requested: str, options: RemoteOptions):
        import httpx

        self.options = options
        base = options.remote_url
        self.api_url = base if base.endswith("/v1") else base + "/v1"
        self.root_url = self.api_url[: -len("/v1")]
        headers = {"Authorization": f"Bearer {options.remote_api_key}"} if options.remote_api_key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(options.remote_timeout, connect=10.0))
        self._lock = threading.Lock()
        self._bos_ids: list[int] = []
        try:
            self._probe(requested)
        except BaseException:
            self._http.close()
            raise

    # --- finding out what the server is -------------------------------------------------------------------------
    def _get(self, url: str) -> Any | None:
        import httpx

        try:
            response = self._http.get(url, timeout=10.0)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def _post(self, url: str, body: dict[str, Any]) -> Any | None:
        import httpx

        try:
            response = self._http.post(url, json=body, timeout=30.0)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def _probe(self, requested: str) -> None:
        import httpx

        try:
            response = self._http.get(self.api_url + "/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise ModelLoadError(f"Cannot reach the remote server at {self.api_url}: {exc}") from None
        if response.status_code in (401, 403):
            raise ModelLoadError(f"The remote server at {self.api_url} refused the key (HTTP {response.status_code}).")
        if response.status_code != 200:
            raise ModelLoadError(f"{self.api_url}/models answered HTTP {response.status_code}; is this an "
                                 "OpenAI-compatible server?")
        try:
            listed = [m["id"] for m in response.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{self.api_url}/models did not answer an OpenAI model list.") from None
        wanted = self.options.remote_model or (requested if requested in listed or not listed else listed[0])
        self.name = wanted
        self.path = Path(wanted)
        self.chat_template = None
        self.bos_token = self.eos_token = None
        self.context_length = self.options.remote_context_length or _DEFAULT_CONTEXT
        self.kind = "openai"
        self.capabilities = frozenset({Capability.LOGPROBS})
        self.supported_params = _OPENAI_KNOBS
        self._text_prompts = True
        info = self._get(self.api_url + "/internal/model/info")
        if isinstance(info, dict) and "supported_params" in info:
            self._as_workbench(info)
            return
        props = self._get(self.root_url + "/props")
        if isinstance(props, dict) and "default_generation_settings" in props:
            self._as_llama_cpp(props)
            return
        if self._post(self.root_url + "/extras/tokenize", {"input": "a"}) is not None:
            self.kind = "llama-cpp-python"
            self.supported_params = _LLAMA_CPP_PYTHON_KNOBS
            empty = self._post(self.root_url + "/extras/tokenize", {"input": ""}) or {}
            self._bos_ids = list(empty.get("tokens", []))  # what its tokenizer adds in front of any text

    def _as_workbench(self, info: dict[str, Any]) -> None:
        self.kind = "workbench"
        if info.get("model_name") and not self.options.remote_model:
            self.name = info["model_name"]
            self.path = Path(self.name)
        self.supported_params = frozenset(info.get("supported_params", [])) | _OPENAI_KNOBS
        remote_caps = set(info.get("capabilities", []))
        self.capabilities = frozenset({Capability.TOKENIZE} | {Capability(c) for c in remote_caps
                                                               if c in ("logprobs", "grammar")})
        self._text_prompts = False
        self.chat_template = info.get("chat_template")
        self.bos_token, self.eos_token = info.get("bos_token"), info.get("eos_token")
        if not self.options.remote_context_length and info.get("context_length"):
            self.context_length = int(info["context_length"])

    def _as_llama_cpp(self, props: dict[str, Any]) -> None:
        self.kind = "llama.cpp"
        self.supported_params = _LLAMA_CPP_KNOBS
        self.capabilities = frozenset({Capability.TOKENIZE, Capability.LOGPROBS, Capability.GRAMMAR})
        self._text_prompts = False
        self.chat_template = props.get("chat_template") or None
        self.bos_token, self.eos_token = props.get("bos_token") or None, props.get("eos_token") or None
        n_ctx = props.get("default_generation_settings", {}).get("n_ctx")
        if not self.options.remote_context_length and n_ctx:
            self.context_length = int(n_ctx)

    # --- tokens --------------------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        if self.kind == "workbench":
            return self._need(self._post(self.api_url + "/internal/encode", {"text": text, "add_bos": add_bos}),
                              "tokens")
        if self.kind == "llama.cpp":
            return self._need(self._post(self.root_url + "/tokenize", {"content": text, "add_special": add_bos,
                                                                       "parse_special": True}), "tokens")
        if self.kind == "llama-cpp-python":
            ids = self._need(self._post(self.root_url + "/extras/tokenize", {"input": text}), "tokens")
            bos = self._bos_ids
            if bos and ids[:len(bos)] == bos and not add_bos:
                ids = ids[len(bos):]
            return ids
        raise GenerationError(f"The remote server at {self.api_url} offers no tokenizer.")

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        if not ids:
            return ""
        if self.kind == "workbench":
            return self._need(self._post(self.api_url + "/internal/decode", {"tokens": list(ids)}), "text")
        if self.kind == "llama.cpp":
            return self._need(self._post(self.root_url + "/detokenize", {"tokens": list(ids)}), "content")
        if self.kind == "llama-cpp-python":
            return self._need(self._post(self.root_url + "/extras/detokenize", {"tokens": list(ids)}), "text")
        raise GenerationError(f"The remote server at {self.api_url} offers no tokenizer.")

    def _need(self, answer: Any, key: str) -> Any:
        if not isinstance(answer, dict) or key not in answer:
            raise GenerationError(f"The remote server at {self.root_url} did not answer the tokenizer request.")
        return answer[key]

    # --- generation ------------------------------------------------------------------------------------------------
    def constraint_compiler(self) -> TrialCompiler | None:
        """How modules.constraints checks grammars for this server: llama.cpp's own parser for llama.cpp's servers
        (no vocabulary: the server compiles); None for the rest (a workbench checks for itself)."""
        if self.kind not in ("llama.cpp", "llama-cpp-python"):
            return None
        from loaders.llama_cpp_sampling import trial_compiler

        return trial_compiler(None)

    def request_body(self, prompt: list[int] | str, params: GenerationParams) -> dict[str, Any]:
        """The /v1/completions body: OpenAI's fields, plus each knob this kind of server honours."""
        if isinstance(prompt, list) and self._text_prompts:
            prompt = self.decode(prompt)
        body: dict[str, Any] = {"model": self.name, "prompt": prompt, "max_tokens": params.max_new_tokens,
                                "stream": True, "temperature": 0.0 if params.greedy else params.temperature,
                                "top_p": params.top_p, "seed": params.seed}
        if params.stop:
            body["stop"] = params.stop[:4] if self.kind == "openai" else params.stop
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
        if params.logprobs:
            body["logprobs"] = params.logprobs
        if self.kind == "workbench":
            # every knob, neutral ones too: the server must not fill gaps from its own preset
            skip = {"max_new_tokens", "stop", "logprobs", "logit_bias"}
            body.update({k: v for k, v in params.model_dump().items() if k not in body and k not in skip})
            body["add_bos_token"] = False  # the prompt arrives as token ids, BOS already decided here
        elif self.kind == "llama-cpp-python":
            body.update(top_k=params.top_k, min_p=params.min_p, repeat_penalty=params.repetition_penalty,
                        mirostat_mode=params.mirostat_mode, mirostat_tau=params.mirostat_tau,
                        mirostat_eta=params.mirostat_eta)
            grammar = params.grammar_string or _json_schema_grammar(params.json_schema)
            if grammar:
                body["grammar"] = grammar
        elif self.kind == "llama.cpp":
            body.update(top_k=params.top_k, min_p=params.min_p, typical_p=params.typical_p,
                        repeat_penalty=params.repetition_penalty,
                        repeat_last_n=params.repetition_penalty_range or -1,  # its 0 is "off", -1 all
                        dry_multiplier=params.dry_multiplier, dry_base=params.dry_base,
                        dry_allowed_length=params.dry_allowed_length,
                        dry_sequence_breakers=params.dry_sequence_breakers, xtc_threshold=params.xtc_threshold,
                        xtc_probability=params.xtc_probability, mirostat=params.mirostat_mode,
                        mirostat_tau=params.mirostat_tau, mirostat_eta=params.mirostat_eta,
                        top_n_sigma=params.top_n_sigma or -1, ignore_eos=params.ban_eos_token)
            if params.dynamic_temperature:
                middle = (params.dynatemp_low + params.dynatemp_high) / 2
                body.update(temperature=middle, dynatemp_range=(params.dynatemp_high - params.dynatemp_low) / 2,
                            dynatemp_exponent=params.dynatemp_exponent)
            if params.grammar_string:
                body["grammar"] = params.grammar_string
            elif params.json_schema is not None:
                body["json_schema"] = params.json_schema
        return body

    def stream(self, prompt: list[int] | str, params: GenerationParams,
               cancel: threading.Event) -> Iterator[TokenEvent]:
        import httpx

        body = self.request_body(prompt, params)
        with self._lock:
            try:
                with self._http.stream("POST", self.api_url + "/completions", json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        # 4xx: the server refused what it was sent (a grammar it cannot parse, a bad value),
                        # which is the request's fault; anything else is the server's.
                        kind = InvalidInput if 400 <= response.status_code < 500 else GenerationError
                        raise kind(f"The remote server answered HTTP {response.status_code}: "
                                   f"{_error_message(response)}")
                    for line in response.iter_lines():
                        if cancel.is_set():
                            return  # leaving the block closes the connection; the server stops generating
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            return
                        yield from _events(data)
            except httpx.HTTPError as exc:
                raise GenerationError(f"The connection to the remote server failed: {exc}") from None

    # --- lifecycle ---------------------------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, loader=self.loader_name, path=self.api_url, context_length=self.context_length,
                         dtype="remote", device=self.root_url, memory_bytes=0, capabilities=sorted(self.capabilities),
                         extra={"server": self.kind})

    def unload(self) -> None:
        self._http.close()


def _events(data: str) -> Iterator[TokenEvent]:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise GenerationError(f"The remote server sent a malformed event: {data[:200]}") from None
    if "error" in chunk:
        error = chunk["error"]
        raise GenerationError(f"The remote server failed: {error.get('message') if isinstance(error, dict) else error}")
    choices = chunk.get("choices") or []
    if not choices:
        return  # a usage-only chunk
    choice = choices[0]
    text = choice.get("text") or ""
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("tokens") or []
    if tokens and "".join(tokens) == text:
        values = logprobs.get("token_logprobs") or [None] * len(tokens)
        tops = logprobs.get("top_logprobs") or [{}] * len(tokens)
        for token, value, top in zip(tokens, values, tops):
            alternatives = [TopLogprob(token=t, token_id=-1, logprob=lp) for t, lp in (top or {}).items()]
            yield TokenEvent(token_id=-1, text=token, logprob=value, top_logprobs=alternatives)
    elif text:
        yield TokenEvent(token_id=-1, text=text)


def _error_message(response: Any) -> str:
    try:
        error = response.json().get("error")
        return error.get("message", str(error)) if isinstance(error, dict) else str(error or response.text[:300])
    except (ValueError, AttributeError):
        return response.text[:300]


def _json_schema_grammar(schema: dict[str, Any] | None) -> str:
    if schema is None:
        return ""
    from loaders.llama_cpp_sampling import constraint_gbnf
    from modules.constraints import constraint_text

    return constraint_gbnf(*constraint_text("", schema))
