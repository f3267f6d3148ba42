"""VLLMEngine: the `Sampler` and `WeightSyncSampler` over vLLM servers (`sampler.backend: vllm`);
`policy.vllm_model.vllm_engine` builds one for a job's model.

Only token generation moves: the runtime server still renders prompts, captures turns and stores
trajectories, and hands this engine token ids. Each request goes token-in/token-out to vLLM's
OpenAI completions endpoint: `prompt` is the id list, the answer carries the sampled ids
(`return_token_ids`) and their logprobs, so nothing is re-tokenized. The servers run with
`--logprobs-mode processed_logprobs` (log softmax of the temperature-scaled logits, this repo's
convention), `--generation-config vllm` (no model defaults such as top_k or a repetition penalty)
and prefix caching.

Routing (`policy.vllm_router.Router`): a trajectory's turns (`cache_key`) go to the replica that served its last
turn, whose prefix cache holds its KV; a new trajectory goes to the replica with the fewest
requests in flight. A request whose replica fails (connection error, 5xx) is tried again on
another one (`sampler/retries` counts those tries) while the failed replica is restarted (a server
this engine started) or polled until healthy again (an attached one), then given the current
weights.

Weight sync (`update_weights`): the new weights are written as one safetensors file (in the
servers' dtype; written beside and renamed, so a restarting replica never reads half a file) and
every replica, paused with its requests kept (`/pause?mode=keep`), reloads them in place with
`collective_rpc("reload_weights")` (vLLM's own loader), drops its prefix cache (running requests
recompute their KV with the new weights) and resumes: requests in flight are never dropped. This is the path
where NCCL and CUDA IPC do not apply (the CPU, a trainer on other machines). `Completion.version`
is the version current when the request was sent: no token of it came from older weights, so the
staleness bound of the async loop holds (it may be one version too old for a request that spanned
an update, never too new).

LoRA (`serve_adapters`): servers started with `--enable-lora` keep the base weights and get only
the adapters: each version is written as a PEFT directory and loaded under its own name
(`/v1/load_lora_adapter`, `policy-<engine tag>-v<N>`); new requests name the newest, a request in flight
finishes on the adapter it started with (finish-then-swap: its tokens all come from one version),
and an adapter is unloaded once no request uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from turnwise.config import VLLMConfig
from turnwise.policy.sampler import EngineClosedError, PromptTooLongError
from turnwise.policy.vllm_router import Router
from turnwise.policy.vllm_server import (
    SERVED_NAME,
    STARTUP_TIMEOUT,
    VLLMServer,
    VLLMStartError,
    wait_healthy,
)
from turnwise.types import Completion, FinishReason, SamplingParams

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for `--max-lora-rank`."""
_PEFT_NAME = re.compile(r"\.(lora_[AB]|lora_embedding_[AB])\.[^.]+\.")
"""The adapter-name part of a PeftModel parameter name (`...q_proj.lora_A.default.weight`),
which PEFT's saved files leave out."""


class SamplerUnavailableError(RuntimeError):
    """No vLLM replica answered within the retries."""


class _RefusedError(RuntimeError):
    """A control call answered 4xx (e.g. an adapter load on a server without LoRA)."""


@dataclass
class _Replica:
    url: str
    server: VLLMServer | None
    """The process this engine started (None: an attached server)."""
    in_flight: int = 0
    up: bool = True


class VLLMEngine:
    """Samples on vLLM servers: started here (`cfg.replicas`) or attached (`cfg.urls`)."""

    supports_grammar = False
    supports_top_logprobs = True

    def __init__(self, cfg: VLLMConfig, model_dir: Path, *, dtype: str, stop_token_ids: Collection[int],
                 version: int = 0, work_dir: Path | None = None, own_work_dir: bool | None = None,
                 untied: tuple[str, str] | None = None, lora_rank: int | None = None) -> None:
        """`work_dir`: weights and server logs (None: a temporary directory); removed on `close`
        when the engine made it (`own_work_dir`), unless TURNWISE_KEEP_VLLM_LOGS is set. `untied`:
        (input embedding, output layer) names of a tied pair that the served copy holds apart
        (`policy.vllm_model.save_untied`); a state dict naming only the first sends it as both. `lora_rank`: the
        servers started here serve LoRA adapters up to that rank (`serve_adapters`)."""
        self.cfg = cfg
        self.model_dir = model_dir
        self.dtype = dtype
        self.stop_token_ids = sorted(int(t) for t in stop_token_ids)
        self.untied = untied
        self.lora_rank = lora_rank
        self._version = version
        self._own_work_dir = work_dir is None if own_work_dir is None else own_work_dir
        self.work_dir = Path(tempfile.mkdtemp(prefix="turnwise-vllm-")) if work_dir is None else work_dir
        self.weights_dir = self.work_dir / "weights"
        self.replicas: list[_Replica] = []
        self.router = Router(0)
        self.max_model_len: int | None = None
        self.retries = 0
        """Requests tried again on another replica (all time; `step_metrics` reports the increase)."""
        self.restarts = 0
        self.last_sync_s = 0.0
        self.last_sync_bytes = 0
        self._reported_retries = 0
        self._sync_lock = threading.Lock()
        """Held while weights are written and reloaded (one update at a time, none during a revival)."""
        self._state_lock = threading.Lock()
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self._control = httpx.Client(timeout=STARTUP_TIMEOUT, trust_env=False)
        self._started = False
        self._closed = False
        self._keep_logs = bool(os.environ.get("TURNWISE_KEEP_VLLM_LOGS"))
        self._adapter_config: Any = None
        """The PEFT `LoraConfig` of the adapters synced (`serve_adapters`); None: full weights."""
        self._served = SERVED_NAME
        """The model name new requests ask for: the base, or the newest adapter."""
        self._using: Counter[str] = Counter()
        """Requests in flight per served name (an adapter is unloaded once it has none)."""
        self._adapter_tag = os.urandom(3).hex()
        """In adapter names: jobs attached to the same servers keep apart."""
        self._loaded: list[str] = []
        """Adapters loaded on the servers, oldest first (a restarted replica loads them again)."""

    @property
    def version(self) -> int:
        return self._version

    # lifecycle

    def start(self) -> VLLMEngine:
        """Start the servers (all at once) or check the attached ones; waits for /health."""
        if self._started:
            return self
        if self._closed:
            raise EngineClosedError("engine is closed")
        if self.cfg.urls:
            for url in self.cfg.urls:
                wait_healthy(url.rstrip("/"), STARTUP_TIMEOUT)
            self.replicas = [_Replica(url.rstrip("/"), None) for url in self.cfg.urls]
        else:
            servers = [self._server(i).start() for i in range(self.cfg.replicas)]
            try:
                self.replicas = [_Replica(s.wait(), s) for s in servers]
            except BaseException:
                self._keep_logs = True  # the error names a log in the work directory
                for s in servers:
                    s.stop()
                raise
        self.router = Router(len(self.replicas))
        self.max_model_len = self._max_model_len(self.replicas[0].url)
        self._started = True
        return self

    def _server(self, i: int) -> VLLMServer:
        args = list(self.cfg.args)
        if self.lora_rank is not None:  # two adapters at once: the newest and one finishing its requests
            rank = next((r for r in _LORA_RANKS if r >= self.lora_rank), self.lora_rank)
            args += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "2"]
        return VLLMServer(self.cfg.python, self.model_dir, dtype=self.dtype, args=args,
                          log_path=self.work_dir / f"vllm-{i}.log")

    def _max_model_len(self, url: str) -> int | None:
        models = self._control.get(url + "/v1/models").json().get("data", [])
        return int(models[0]["max_model_len"]) if models and models[0].get("max_model_len") else None

    def close(self) -> None:
        """Stop the servers this engine started (attached ones keep running). Idempotent."""
        self._closed = True
        for r in self.replicas:
            if r.server is not None:
                r.server.stop()
            elif r.up:  # an attached server outlives the job: its adapters go
                for name in self._loaded:
                    with contextlib.suppress(httpx.HTTPError, RuntimeError):
                        self._call(r.url, "/v1/unload_lora_adapter", json={"lora_name": name})
        self._control.close()
        for loop, client in list(self._clients.items()):
            if not loop.is_closed() and loop.is_running():
                with contextlib.suppress(RuntimeError):
                    asyncio.run_coroutine_threadsafe(client.aclose(), loop)
        self._clients.clear()
        if self._own_work_dir and not self._keep_logs:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> VLLMEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # sampling

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       cache_key: str | None = None) -> Completion:
        """One completion of `prompt_ids` on a replica (see the module docstring for routing)."""
        if self._closed or not self._started:
            raise EngineClosedError("vLLM engine closed" if self._closed else "vLLM engine not started")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty")
        limit = self.max_model_len
        if limit is not None and len(prompt) >= limit:
            raise PromptTooLongError(f"prompt has {len(prompt)} tokens; the model's context is {limit}")
        version = self._version
        if params.max_tokens <= 0:
            return Completion((), (), FinishReason.LENGTH, version, 0)
        body = self._body(prompt, params, limit)
        with self._state_lock:
            body["model"] = served = self._served
            version = self._version
            self._using[served] += 1
        try:
            return await self._send(body, cache_key, version, params.top_logprobs)
        finally:
            with self._state_lock:
                self._using[served] -= 1

    async def _send(self, body: dict[str, Any], cache_key: str | None, version: int, top_k: int) -> Completion:
        client = self._client()
        failed: set[int] = set()
        attempts = 0
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            i = self.router.pick(cache_key, exclude=failed)
            if i is None:  # every replica is down (or failed this request): wait for a restart
                if time.monotonic() > deadline:
                    raise SamplerUnavailableError("no vLLM replica is up")
                await asyncio.sleep(0.2)
                failed.clear()
                continue
            replica = self.replicas[i]
            try:
                response = await client.post(replica.url + "/v1/completions", json=body)
                error = None if response.status_code < 500 else f"HTTP {response.status_code}"
            except httpx.TransportError as e:
                error = f"{type(e).__name__}: {e}"
            finally:
                self.router.release(i)
            if error is None:
                break
            self._replica_failed(i)
            failed.add(i)
            attempts += 1
            if attempts > self.cfg.max_retries:
                raise SamplerUnavailableError(f"vLLM replica {replica.url} failed ({error}); "
                                              f"no try of {self.cfg.max_retries} retries succeeded")
            self.retries += 1
        if response.status_code != 200:
            raise ValueError(f"vLLM refused the request: {response.text[:300]}")
        return _completion(response.json(), version, top_k)

    def _body(self, prompt: list[int], params: SamplingParams, limit: int | None) -> dict[str, Any]:
        max_tokens = params.max_tokens if limit is None else min(params.max_tokens, limit - len(prompt))
        greedy = params.temperature <= 0
        body: dict[str, Any] = {
            "model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0 if greedy else params.temperature, "top_p": 1.0 if greedy else params.top_p,
            "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
            "logprobs": params.top_logprobs, "stop_token_ids": self.stop_token_ids,
            "skip_special_tokens": False, "spaces_between_special_tokens": False,
            "include_stop_str_in_output": True, "return_token_ids": True, "return_tokens_as_token_ids": True,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for closed in [other for other in self._clients if other.is_closed()]:
                del self._clients[closed]  # an httpx client belongs to one loop; that one is gone
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
            client = httpx.AsyncClient(timeout=None, limits=limits, trust_env=False)
            self._clients[loop] = client
        return client

    # failures

    def _replica_failed(self, i: int) -> None:
        """Take replica `i` out of routing and bring it back in a thread (once per failure)."""
        replica = self.replicas[i]
        with self._state_lock:
            if not replica.up:
                return
            replica.up = False
        self.router.set_up(i, False)
        threading.Thread(target=self._revive, args=(i,), name=f"turnwise-vllm-revive-{i}", daemon=True).start()

    def _revive(self, i: int) -> None:
        replica = self.replicas[i]
        try:
            if replica.server is not None and not self._closed:
                replica.server.stop()
                replica.server.start()
                if self._closed:  # closed meanwhile: `close` may have missed this process
                    replica.server.stop()
                    return
                replica.url = replica.server.wait()
                self.restarts += 1
            else:
                wait_healthy(replica.url, STARTUP_TIMEOUT)
            with self._sync_lock:
                if self._closed:
                    return
                if (self.weights_dir / "model.safetensors").is_file():  # it came back with the weights it started with
                    self._reload(replica.url)
                for name in self._loaded:  # and with no adapters
                    self._load_adapter(replica.url, name)
                replica.up = True
                self.router.set_up(i, True)
        except (VLLMStartError, httpx.HTTPError, RuntimeError):
            return  # stays out of routing; requests go to the others

    # weight sync

    def serve_adapters(self, config: Any, base: Mapping[str, torch.Tensor],
                       adapters: Mapping[str, torch.Tensor]) -> bool:
        """Sync LoRA adapters of PEFT `config` (a `LoraConfig`) from now on instead of merged
        weights: loads `base` (Hugging Face names, e.g. the warm start's weights) and `adapters`
        (PeftModel names) as the current version. False, and nothing changed for the adapters,
        when the servers cannot: started here without `lora_rank` (or a smaller one), or attached
        ones that refuse the adapter (not started with `--enable-lora`, or a smaller rank)."""
        if not self.cfg.urls and (self.lora_rank is None or config.r > self.lora_rank):
            return False
        self.update_weights(base, version=self._version)
        self._adapter_config = config
        try:
            self._publish_adapter(adapters, self._version, getattr(torch, self.dtype), time.perf_counter())
        except _RefusedError as e:
            self._adapter_config = None
            warnings.warn(f"the vLLM servers serve no LoRA adapters ({e}); syncing merged weights", stacklevel=2)
            return False
        return True

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int | None = None) -> int:
        """Write `state_dict` (Hugging Face names) as safetensors and have every live replica reload
        it in place; returns the new version. In-flight requests continue (module docstring). After
        `serve_adapters`, `state_dict` is the adapters (PeftModel names), loaded as a new adapter."""
        from safetensors.torch import save_file

        if not self._started:
            raise EngineClosedError("vLLM engine not started")
        t0 = time.perf_counter()
        dtype = getattr(torch, self.dtype)
        if self._adapter_config is not None:
            return self._publish_adapter(state_dict, version, dtype, t0)
        # a tied pair shares storage, which safetensors refuses: each name gets its own copy
        tensors = {name: tensor.detach().to("cpu", dtype).contiguous().clone() for name, tensor in state_dict.items()}
        if self.untied is not None and self.untied[1] not in tensors and self.untied[0] in tensors:
            tensors[self.untied[1]] = tensors[self.untied[0]].clone()  # the served copy's own output layer
        with self._sync_lock:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.weights_dir / ".model.safetensors.tmp"
            save_file(tensors, str(tmp))
            os.replace(tmp, self.weights_dir / "model.safetensors")
            for r in self.replicas:
                if r.up:
                    self._reload(r.url)
            self._version = self._version + 1 if version is None else version
        self.last_sync_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.last_sync_s = time.perf_counter() - t0
        return self._version

    def _publish_adapter(self, state_dict: Mapping[str, torch.Tensor], version: int | None, dtype: torch.dtype,
                         t0: float) -> int:
        """The adapters as a PEFT directory, loaded on every live replica as `policy-<tag>-v<N>`;
        new requests name it; adapters no request uses any more are unloaded."""
        from safetensors.torch import save_file

        if not all(".lora_" in name for name in state_dict):
            raise ValueError("update_weights after serve_adapters takes the LoRA adapters only")
        tensors = {_PEFT_NAME.sub(r".\1.", name): t.detach().to("cpu", dtype).contiguous().clone()
                   for name, t in state_dict.items()}
        new_version = self._version + 1 if version is None else version
        name = f"{SERVED_NAME}-{self._adapter_tag}-v{new_version}"
        with self._sync_lock:
            path = self._adapter_path(name)
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._adapter_config.save_pretrained(str(tmp))
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            for r in self.replicas:
                if r.up:
                    self._load_adapter(r.url, name)
            self._loaded.append(name)
            with self._state_lock:
                self._served, self._version = name, new_version
                idle = [n for n in self._loaded if n != name and not self._using[n]]
            for old in idle:
                self._unload_adapter(old)
        self.last_sync_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.last_sync_s = time.perf_counter() - t0
        return self._version

    def _adapter_path(self, name: str) -> Path:
        return self.weights_dir / "adapters" / name

    def _load_adapter(self, url: str, name: str) -> None:
        self._call(url, "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(self._adapter_path(name))})

    def _unload_adapter(self, name: str) -> None:
        for r in self.replicas:
            if r.up:
                self._call(r.url, "/v1/unload_lora_adapter", json={"lora_name": name})
        self._loaded.remove(name)
        del self._using[name]
        shutil.rmtree(self._adapter_path(name), ignore_errors=True)

    def _reload(self, url: str) -> None:
        """Pause (requests in flight are kept, frozen), reload the weights file in place, drop the
        prefix cache (running requests are preempted and recompute their KV with the new weights:
        no token after the swap reads old KV), resume."""
        self._call(url, "/pause", params={"mode": "keep"})
        try:
            self._call(url, "/collective_rpc", json={
                "method": "reload_weights", "kwargs": {"weights_path": str(self.weights_dir)}})
            self._call(url, "/reset_prefix_cache", params={"reset_running_requests": "true"})
        finally:
            self._call(url, "/resume")

    def _call(self, url: str, path: str, **kwargs: Any) -> None:
        response = self._control.post(url + path, **kwargs)
        if response.status_code != 200:
            error = _RefusedError if 400 <= response.status_code < 500 else RuntimeError
            raise error(f"vLLM {url}{path} answered {response.status_code}: {response.text[:300]} "
                        "(weight sync needs a server started with VLLM_SERVER_DEV_MODE=1, "
                        "adapter sync VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")

    def step_metrics(self) -> dict[str, float]:
        """`sampler/retries` since the last call (the training loop logs it each step)."""
        retries, self._reported_retries = self.retries - self._reported_retries, self.retries
        return {"sampler/retries": float(retries)}


def _completion(data: dict[str, Any], version: int, top_k: int) -> Completion:
    choice = data["choices"][0]
    tokens = tuple(int(t) for t in choice["token_ids"])
    logprobs_obj = choice.get("logprobs") or {}
    logprobs = tuple(float(lp) for lp in logprobs_obj.get("token_logprobs") or ())
    if len(logprobs) != len(tokens):
        raise RuntimeError(f"vLLM returned {len(tokens)} tokens but {len(logprobs)} logprobs")
    finish = _FINISH.get(choice.get("finish_reason") or "")
    if finish is None:
        raise RuntimeError(f"vLLM finished a request with {choice.get('finish_reason')!r}")
    usage = data.get("usage") or {}
    cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
    computed = int(usage.get("prompt_tokens", 0)) - cached
    tops: tuple[tuple[tuple[int, float], ...], ...] = ()
    if top_k:
        tops = tuple(tuple(sorted(((int(k.removeprefix("token_id:")), float(v)) for k, v in (d or {}).items()),
                                  key=lambda kv: -kv[1])[:top_k])
                     for d in logprobs_obj.get("top_logprobs") or ())
    return Completion(tokens, logprobs, finish, version, computed, tops)
