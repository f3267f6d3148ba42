"""The Tinker-API sampling side: a connection to a Tinker-compatible service and `TinkerSampler`,
a `backends.Sampler` over the service's sampling client (Thinking Machines' Tinker, SkyRL's
Tinker server, ...), token-in/token-out with the logprob of every sampled token.

The runtime records its completions token-exactly as it does the local engine's. The policy
version is the one the training backend (`train.tinker_backend.TinkerBackend`) gave with the
sampling client of the weights it published (`set_client`); before any publish the sampler
samples the base model, or the sampler checkpoint a run saved (`tinker_state.json`).

Usage: `Completion.prompt_tokens` is the prompt less the tokens the service billed as prefix-cache
hits (its `prompt_cache_hit_tokens`), so the trajectory store counts what was computed; `usage()`
adds the service's own counts and `server_s`, the wall time with at least one request at the
service. Needs the `tinker` SDK (the `tinker` extra).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from turnwise.config import ConfigError, JobConfig
from turnwise.types import Completion, FinishReason, SamplingParams

STATE_FILE = "tinker_state.json"
"""What a Tinker checkpoint directory holds: the service's paths and ids of the run's state."""


class TinkerError(ConfigError):
    """The Tinker service is unreachable, refused or lacks something; the message says what."""


def connect(base_url: str | None, api_key: str | None) -> Any:
    """A `tinker.ServiceClient` for `base_url` (None: $TINKER_BASE_URL, else Thinking Machines')
    with `api_key` (None: $TINKER_API_KEY)."""
    try:
        import tinker
    except ImportError:
        raise TinkerError("the Tinker backend needs the tinker SDK: pip install 'turnwise[tinker]'") from None
    key = api_key or os.environ.get("TINKER_API_KEY")
    if not key:
        raise TinkerError("tinker.api_key is not set and neither is $TINKER_API_KEY")
    kwargs: dict[str, Any] = {"api_key": key}
    if base_url:
        kwargs["base_url"] = base_url
    return tinker.ServiceClient(**kwargs)


def open_sampler(cfg: JobConfig, stop_token_ids: Sequence[int], model_path: str | None = None) -> TinkerSampler:
    """The sampler of `sampler.backend: tinker`: the base model `tinker.base_model`, or the sampler
    weights a Tinker checkpoint directory `model_path` names (evaluating a run's checkpoint)."""
    if not cfg.tinker.base_model:
        raise ConfigError("sampler.backend tinker needs tinker.base_model (the service's name of the model)")
    state = read_state(Path(model_path)) if model_path else None
    return TinkerSampler(connect(cfg.tinker.base_url, cfg.tinker.api_key), stop_token_ids=stop_token_ids,
                         base_model=cfg.tinker.base_model, model_path=(state or {}).get("sampler_path"),
                         version=int((state or {}).get("policy_version", 0)))


def read_state(path: Path) -> dict[str, Any] | None:
    """The `tinker_state.json` of checkpoint directory `path` (or its `model/`), if any."""
    for candidate in (path / STATE_FILE, path / "model" / STATE_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    return None


class TinkerSampler:
    """Samples through a Tinker sampling client; `set_client` swaps in newly published weights."""

    supports_grammar = False
    supports_top_logprobs = False

    def __init__(self, service: Any, *, stop_token_ids: Sequence[int], base_model: str | None = None,
                 model_path: str | None = None, version: int = 0) -> None:
        """`base_model` or `model_path` (a `tinker://` sampler checkpoint): what to sample before
        the first `set_client`."""
        self.service = service
        self.stop_token_ids = list(stop_token_ids)
        self._base_model, self._model_path = base_model, model_path
        self._client: Any = None
        self._version = version
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy_since = 0.0
        self._usage = {"server_s": 0.0, "cache_hit_tokens": 0.0, "requests": 0.0}

    @property
    def version(self) -> int:
        return self._version

    def set_client(self, client: Any, version: int) -> None:
        """Sample with `client` (the weights of policy `version`) from the next request on."""
        self._client, self._version = client, version

    def start(self) -> None:
        """Nothing to start: the service samples (the runtime calls it for every engine)."""

    def close(self) -> None:
        """Nothing to stop here; the service keeps its own sessions."""

    def usage(self, reset: bool = True) -> dict[str, float]:
        """The service's side since the last reset: `server_s` (wall seconds with a request in
        flight), `cache_hit_tokens` (its `prompt_cache_hit_tokens`), `requests`."""
        with self._lock:
            out = dict(self._usage)
            if self._in_flight:
                out["server_s"] += time.perf_counter() - self._busy_since
            if reset:
                self._usage = dict.fromkeys(self._usage, 0.0)
                self._busy_since = time.perf_counter()
        return out

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        import tinker

        if params.stop:
            raise ValueError("the Tinker sampler stops on the chat format's end-of-turn tokens only; "
                             "stop strings are not supported")
        client, version = self._client_now()
        seed = None if params.seed is None else params.seed % 2**31  # SkyRL's server takes int32 seeds
        sp = tinker.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                                   top_p=params.top_p, seed=seed, stop=self.stop_token_ids)
        cached = 0
        self._enter()
        try:
            response = await client.sample_async(prompt=tinker.ModelInput.from_ints(list(prompt_ids)),
                                                  num_samples=1, sampling_params=sp)
            cached = int(response.prompt_cache_hit_tokens or 0)
        finally:
            self._leave(cached)
        seq = response.sequences[0]
        tokens = tuple(int(t) for t in seq.tokens)
        if seq.logprobs is None or len(seq.logprobs) != len(tokens):
            raise TinkerError("the Tinker service returned no logprob for every sampled token")
        return Completion(token_ids=tokens, logprobs=tuple(float(x) for x in seq.logprobs),
                          finish_reason=FinishReason.LENGTH if seq.stop_reason == "length" else FinishReason.STOP,
                          version=version,
                          prompt_tokens=max(1, len(prompt_ids) - cached))

    # -- pieces ---------------------------------------------------------------------------

    def _client_now(self) -> tuple[Any, int]:
        with self._lock:
            if self._client is None:
                if self._model_path is None and self._base_model is None:
                    raise TinkerError("the Tinker sampler has no weights: set tinker.base_model")
                self._client = self.service.create_sampling_client(model_path=self._model_path,
                                                                   base_model=None if self._model_path
                                                                   else self._base_model)
            return self._client, self._version

    def _enter(self) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1

    def _leave(self, cached: int) -> None:
        with self._lock:
            self._in_flight -= 1
            self._usage["requests"] += 1
            self._usage["cache_hit_tokens"] += float(cached)
            if self._in_flight == 0:
                self._usage["server_s"] += time.perf_counter() - self._busy_since
