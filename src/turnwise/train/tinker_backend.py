"""`TinkerBackend`: `backends.TrainingBackend` over a Tinker-API service's LoRA training client
(Thinking Machines' Tinker, SkyRL's Tinker server, ...), publishing to a `policy.tinker.TinkerSampler`.

Datums: a segment of T tokens is the model input `tokens[:-1]` with targets `tokens[1:]`; the
loss inputs are the targets' sampler logprobs and advantages (`cross_entropy`: weights).

Losses: the service's built-in losses sum a per-token term over the targets; ours aggregate
(`loss_agg_mode`). Every built-in term is linear in its advantage (or weight) c·A with c > 0,
so each datum's advantages are scaled by its share of the aggregate (token-mean: 1 / all loss
tokens of the call; seq-mean-token-mean: 1 / (its tokens × sequences); ...) and the built-in
gives our loss and gradient. A service that reduces otherwise (`tinker.loss_reduction:
sequence_mean`, SkyRL 0.3's JAX backend: per-datum means, then their mean) gets the advantages
multiplied back (`reduction_scales`). `ppo`, `cispo`, `importance_sampling` and `cross_entropy` go to the
built-ins of those names when the options need nothing else (token-level ratio, no dual clip,
TIS or KL); any other case, and every other registered loss, runs our own `compute_loss` on the
service's logprobs through the SDK's `forward_backward_custom` (a forward, our loss and its
gradient here, a weighted backward there). `kl_coef` > 0 is refused (the service computes no
reference logprobs). The loss metrics are computed here from the logprobs the service returns,
with the same code as the local backend, so they mean the same.

Checkpoints: `save_state` asks the service to save weights and optimizer (`save_state`) and writes
the returned `tinker://` path with the policy version to `model/tinker_state.json`;
`load_state` restores both (`load_state_with_optimizer`). `export` saves sampler weights, downloads
their archive where the service serves one, and writes a Hugging Face directory (the adapter
merged into `model.path`'s weights when they are there, else the PEFT adapter). Timing and the
service's usage counts since the previous optimizer step come with `optim_step`'s metrics.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from turnwise.algo.losses import compute_loss
from turnwise.config import ConfigError, JobConfig
from turnwise.policy.tinker import STATE_FILE, TinkerError, TinkerSampler, read_state
from turnwise.train.backend import pad_datums
from turnwise.types import AdamParams, Datum, LossOptions

BUILTIN_LOSSES = ("ppo", "cispo", "importance_sampling", "cross_entropy")


def open_tinker(cfg: JobConfig, rt: Any) -> TinkerBackend:
    """The backend of `trainer.backend: tinker` for an `EmbeddedRuntime` sampling at the service."""
    if cfg.tinker.loss_reduction == "sequence_mean" and builtin_loss(cfg.loss_fn, cfg.loss_options()) is None:
        raise ConfigError(f"tinker.loss_reduction sequence_mean: loss_fn {cfg.loss_fn} with these options runs "
                          "through forward_backward_custom, whose signed weights such a service divides by; use "
                          f"one of {', '.join(BUILTIN_LOSSES)} (token-level ratio, no dual clip, tis_cap or KL)")
    if not isinstance(rt.engine, TinkerSampler):
        raise ConfigError("trainer.backend tinker samples at the service too: set sampler.backend: tinker")
    if cfg.trainer.nproc != 1 or cfg.lora_alpha is not None:
        raise ConfigError("trainer.backend tinker: the service sets its own ranks and LoRA scale; "
                          "leave trainer.nproc and lora_alpha unset")
    sizes = cfg.lora_sizes()
    base_model = cfg.tinker.base_model or ""
    try:
        client = rt.engine.service.create_lora_training_client(base_model=base_model,
                                                               rank=sizes[0] if sizes else 32, seed=cfg.seed)
    except Exception as e:  # the SDK's connection and status errors, after its own retries
        raise TinkerError(f"the Tinker service at {cfg.tinker.base_url or 'the default URL'} did not create a "
                          f"LoRA training client for {base_model!r}: {type(e).__name__}: {e}") from None
    return TinkerBackend(rt.engine.service, client, rt.engine, base_model=base_model, tokenizer=rt.tokenizer,
                         local_model_path=cfg.model.path, loss_reduction=cfg.tinker.loss_reduction)


def builtin_loss(loss_fn: str, options: LossOptions) -> tuple[str, dict[str, float] | None] | None:
    """The service's built-in loss (name, loss_fn_config) equal to ours, or None."""
    if loss_fn not in BUILTIN_LOSSES or options.kl_coef > 0 or options.tis_cap is not None \
            or options.ratio_level != "token" or (loss_fn == "ppo" and options.clip_ratio_c is not None):
        return None
    if loss_fn in ("ppo", "cispo"):
        return loss_fn, {"clip_low_threshold": options.clip_low_threshold,
                         "clip_high_threshold": options.clip_high_threshold}
    return loss_fn, None


def datum_scales(datums_D: Sequence[Datum], options: LossOptions) -> list[float]:
    """Each datum's factor c on its per-token terms so that their sum is our aggregate."""
    n = [sum(d.segment.loss_mask_T) for d in datums_D]
    live = sum(k > 0 for k in n) or 1
    mode = options.loss_agg_mode
    if mode == "token-mean":
        return [1.0 / max(sum(n), 1)] * len(n)
    if mode == "seq-mean-token-mean":
        return [1.0 / (k * live) if k else 0.0 for k in n]
    if mode == "seq-mean-token-sum":
        return [1.0 / live] * len(n)
    norm = options.loss_agg_norm or max(len(d.segment.tokens_T) for d in datums_D)
    return [1.0 / (live * norm)] * len(n)


def reduction_scales(datums_D: Sequence[Datum], loss_fn: str, reduction: str) -> list[float]:
    """Each datum's factor undoing the service's reduction (`tinker.loss_reduction`), so that the
    service's gradient is that of the summed per-token terms: under sequence_mean, its target count
    times the call's datums (cross_entropy: 1, its weights normalize themselves)."""
    if reduction == "sum" or loss_fn == "cross_entropy":
        return [1.0] * len(datums_D)
    return [float((len(d.segment.tokens_T) - 1) * len(datums_D)) for d in datums_D]


def to_tinker(d: Datum, loss_fn: str, scale: float, *, custom: bool = False) -> Any:
    """One datum in the SDK's shape (targets shifted by one); `custom`: targets only."""
    import tinker

    seg = d.segment
    mask = seg.loss_mask_T[1:]
    inputs: dict[str, Any] = {"target_tokens": tinker.TensorData(data=list(seg.tokens_T[1:]), dtype="int64")}
    if loss_fn == "cross_entropy" and not custom:
        inputs["weights"] = tinker.TensorData(data=[m * scale for m in mask], dtype="float32")
    elif not custom:
        inputs["logprobs"] = tinker.TensorData(data=list(seg.logprobs_T[1:]), dtype="float32")
        inputs["advantages"] = tinker.TensorData(data=[a * m * scale for a, m in zip(d.advantages_T[1:], mask,
                                                                                        strict=True)],
                                                 dtype="float32")
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(list(seg.tokens_T[:-1])), loss_fn_inputs=inputs)


def full_logprobs(target_logprobs: Any) -> torch.Tensor:
    """The service's logprobs of the targets as ours: one per token, 0 at the first."""
    lp = torch.as_tensor(target_logprobs, dtype=torch.float32).reshape(-1)
    return torch.cat([lp.new_zeros(1), lp])


def padded(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])


class TinkerBackend:
    """Trains LoRA adapters at a Tinker service; publishes sampling clients to `sampler`."""

    def __init__(self, service: Any, training_client: Any, sampler: TinkerSampler | None, *,
                 base_model: str, tokenizer: Any, local_model_path: str | None = None,
                 loss_reduction: str = "sum") -> None:
        self.service = service
        self.loss_reduction = loss_reduction
        self.client = training_client
        self.sampler = sampler
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.local_model_path = local_model_path
        self.version = sampler.version if sampler is not None else 0
        self.sync_bytes = 0
        """Nothing travels from this process: the service publishes its own weights."""
        self._changed = True
        self._server_train_s = 0.0

    # -- TrainingBackend ------------------------------------------------------------------

    def forward_backward(self, datums_D: Sequence[Datum], loss_fn: str,
                         loss_options: LossOptions) -> dict[str, float]:
        if loss_options.kl_coef > 0:
            raise TinkerError("kl_coef > 0 needs reference logprobs, which a Tinker service does not compute; "
                              "set kl_coef: 0 with trainer.backend tinker")
        builtin = builtin_loss(loss_fn, loss_options)
        t0 = time.perf_counter()
        if builtin is not None:
            scales = datum_scales(datums_D, loss_options)
            undo = reduction_scales(datums_D, loss_fn, self.loss_reduction)
            data = [to_tinker(d, loss_fn, c * u) for d, c, u in zip(datums_D, scales, undo, strict=True)]
            out = self.client.forward_backward(data, builtin[0], builtin[1]).result()
        elif self.loss_reduction != "sum":
            raise TinkerError(f"tinker.loss_reduction {self.loss_reduction}: {loss_fn} with these options needs "
                              "forward_backward_custom, which such a service cannot run")
        else:
            data = [to_tinker(d, loss_fn, 1.0, custom=True) for d in datums_D]
            out = self.client.forward_backward_custom(data, self._custom_loss(datums_D, loss_fn, loss_options)) \
                .result()
        self._server_train_s += time.perf_counter() - t0
        logprobs = [full_logprobs(o["logprobs"].data) for o in out.loss_fn_outputs]
        return self._loss_metrics(datums_D, logprobs, loss_fn, loss_options)

    def optim_step(self, adam: AdamParams) -> dict[str, float]:
        import tinker

        t0 = time.perf_counter()
        response = self.client.optim_step(tinker.AdamParams(
            learning_rate=adam.learning_rate, beta1=adam.beta1, beta2=adam.beta2, eps=adam.eps,
            weight_decay=adam.weight_decay, grad_clip_norm=adam.max_grad_norm)).result()
        self._server_train_s += time.perf_counter() - t0
        self._changed = True
        metrics = {"train/learning_rate": adam.learning_rate}
        norms = [v for k, v in (response.metrics or {}).items() if k.rsplit("/", 1)[-1] == "grad_norm"]
        if norms:  # the service's own (SkyRL: skyrl.ai/grad_norm)
            metrics["loss/grad_norm"] = float(norms[0])
        return metrics | self.usage()

    def save_weights_for_sampler(self) -> int:
        if self._changed:
            self.version += 1
        if self.sampler is not None and (self._changed or self.sampler.version != self.version):
            t0 = time.perf_counter()
            self.sampler.set_client(self.client.save_weights_and_get_sampling_client(), self.version)
            self._server_train_s += time.perf_counter() - t0
        self._changed = False
        return self.version

    def save_state(self, path: Path) -> None:
        t0 = time.perf_counter()
        saved = self.client.save_state(f"{path.name}-v{self.version}").result()
        self._server_train_s += time.perf_counter() - t0
        self._write_state(path / "model", {"state_path": saved.path, "policy_version": self.version,
                                           "changed": self._changed})

    def load_state(self, path: Path) -> None:
        state = read_state(path)
        if state is None or "state_path" not in state:
            raise TinkerError(f"{path} holds no Tinker checkpoint ({STATE_FILE} with a state_path)")
        self.client.load_state_with_optimizer(state["state_path"]).result()
        self.version, self._changed = int(state["policy_version"]), bool(state["changed"])

    def forward(self, datums_D: Sequence[Datum]) -> list[tuple[float, ...]]:
        data = [to_tinker(d, "cross_entropy", 0.0) for d in datums_D]
        out = self.client.forward(data, "cross_entropy").result()
        return [tuple(full_logprobs(o["logprobs"].data).tolist()) for o in out.loss_fn_outputs]

    def export(self, path: Path) -> None:
        """Sampler weights saved at the service; downloaded and written as an HF directory where
        the service serves archives (else only `tinker_state.json` with their path)."""
        saved = self.client.save_weights_for_sampler(f"final-v{self.version}").result()
        state = {"sampler_path": saved.path, "policy_version": self.version}
        # tinker://<run>/[sampler_weights/]<name>: SkyRL 0.3.0 leaves out the middle part, which the
        # SDK's get_checkpoint_archive_url_from_tinker_path requires, so the two ids go separately
        run, _, rest = saved.path.removeprefix("tinker://").partition("/")
        try:
            archive = self.service.create_rest_client().get_checkpoint_archive_url(run, rest.rsplit("/", 1)[-1]) \
                .result()
        except Exception as e:  # a service without archives: the weights stay there
            self._write_state(path, state | {"download": f"not offered by the service: {type(e).__name__}"})
            return
        with tempfile.TemporaryDirectory() as tmp:
            adapter = download_adapter(archive.url, Path(tmp))
            write_hf_dir(adapter, path, self.local_model_path, self.tokenizer)
        self._write_state(path, state)

    # -- pieces ---------------------------------------------------------------------------

    def usage(self) -> dict[str, float]:
        """The service's side since the last call: seconds waiting on training calls, sampling,
        and the prompt tokens it billed as cache hits (when it reported any)."""
        out = {"speed/server_train_s": self._server_train_s}
        self._server_train_s = 0.0
        if self.sampler is not None:
            sampled = self.sampler.usage()
            out["speed/server_sample_s"] = sampled["server_s"]
            if sampled["cache_hit_tokens"]:
                out["rollout/server_cache_hit_tokens"] = sampled["cache_hit_tokens"]
        return out

    def _write_state(self, directory: Path, state: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        info = {"base_model": self.base_model, "model_id": getattr(self.client, "model_id", None)}
        (directory / STATE_FILE).write_text(json.dumps(info | state, indent=1), encoding="utf-8")

    def _loss_metrics(self, datums_D: Sequence[Datum], logprobs: Sequence[torch.Tensor], loss_fn: str,
                      options: LossOptions) -> dict[str, float]:
        t = pad_datums(datums_D)
        lp = padded(logprobs, t["tokens_B_T"].shape[1])
        with torch.no_grad():
            extra = {"old_logprobs_B_T": t.get("old_logprobs_B_T", lp)} if options.tis_cap is not None else {}
            loss, metrics = compute_loss(loss_fn, lp, t["sampler_logprobs_B_T"], t["advantages_B_T"],
                                         t["mask_B_T"], options, **extra)
        metrics = {**metrics, "loss/value": float(loss)}
        if loss_fn != "cross_entropy":
            diff = (lp - t["sampler_logprobs_B_T"]).abs() * t["mask_B_T"]
            metrics["train/logprob_mismatch"] = float(diff.sum() / t["mask_B_T"].sum().clamp(min=1))
            metrics["train/logprob_mismatch_max"] = float(diff.max())
        return metrics

    def _custom_loss(self, datums_D: Sequence[Datum], loss_fn: str, options: LossOptions) -> Any:
        """Our `compute_loss` as the SDK's custom loss: (data, target logprobs) -> (loss, metrics)."""
        t = pad_datums(datums_D)
        width = t["tokens_B_T"].shape[1]

        def loss(_data: Any, logprobs_list: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            lp = padded([torch.cat([r.new_zeros(1), r.reshape(-1).float()]) for r in logprobs_list], width)
            old = t.get("old_logprobs_B_T", lp.detach()) if options.tis_cap is not None else None
            value, metrics = compute_loss(loss_fn, lp, t["sampler_logprobs_B_T"], t["advantages_B_T"],
                                          t["mask_B_T"], options, old_logprobs_B_T=old)
            return value, metrics

        return loss


def download_adapter(url: str, tmp: Path) -> Path:
    """The sampler-weights archive at `url`, unpacked under `tmp`; the directory holding the adapter."""
    import httpx

    archive = tmp / "weights.tar.gz"
    with httpx.stream("GET", url, follow_redirects=True, timeout=600) as response:
        response.raise_for_status()
        with archive.open("wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)
    out = tmp / "adapter"
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    found = sorted(out.rglob("adapter_config.json"))
    if not found:
        raise TinkerError(f"the service's weights archive holds no adapter_config.json: {url}")
    return found[0].parent


def write_hf_dir(adapter: Path, path: Path, local_model_path: str | None, tokenizer: Any) -> None:
    """`adapter` merged into the base at `local_model_path` (when its weights are there), else the
    adapter itself, with the tokenizer, as a Hugging Face directory at `path`."""
    import shutil

    base = Path(local_model_path) if local_model_path else None
    path.mkdir(parents=True, exist_ok=True)
    if base is not None and any(base.glob("*.safetensors")):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(path)
    else:
        for f in adapter.iterdir():
            shutil.copy2(f, path / f.name)
    tokenizer.save_pretrained(path)
