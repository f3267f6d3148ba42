"""JobConfig: the one place for defaults.

A YAML file and `--set a.b=c` overrides only change it. Unknown keys fail with the key's
path and the closest valid name. Hyperparameter names follow the managed service
(`global_batch_size`, `group_size`, `loss_fn`, ...), so they sit flat at the top level;
engine and plumbing settings live in sections.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from turnwise.config.sections import (  # re-exported: importers keep `from turnwise.config import X`
    AgentConfig,
    ApiKeyConfig,
    AsyncConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunStopped,
    RuntimeConfig,
    SamplerConfig,
    SandboxConfig,
    TinkerConfig,
    TinyModelConfig,
    TrackingConfig,
    TrainerConfig,
    VerifyConfig,
    VLLMConfig,
    WarmStartConfig,
    _Section,
)
from turnwise.types import AdvantageOptions, LossOptions, SamplingParams

__all__ = [
    "AgentConfig",
    "ApiKeyConfig",
    "AsyncConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "JobConfig",
    "ModelConfig",
    "PATH_KEYS",
    "RunStopped",
    "RuntimeConfig",
    "SamplerConfig",
    "SandboxConfig",
    "TinkerConfig",
    "TinyModelConfig",
    "TrackingConfig",
    "TrainerConfig",
    "VLLMConfig",
    "VerifyConfig",
    "WarmStartConfig",
    "check_algorithms",
    "default_advantage_options",
    "default_loss_options",
    "default_sampling_params",
    "load_config",
    "validate_config",
]


class JobConfig(_Section):
    """Everything a training or evaluation job needs."""

    name: str = "turnwise"
    output_dir: str = "runs"
    seed: int = 0
    plugins: tuple[str, ...] = ()
    """Modules imported at load, e.g. ones that `@register_loss` (the agent may run elsewhere)."""

    # batch shape and schedule
    global_batch_size: int = Field(128, ge=1)
    group_size: int = Field(8, ge=1)
    max_steps: int | None = Field(None, ge=0)
    max_epochs: int = Field(1, ge=1)
    val_every: int = Field(0, ge=0)
    """Validate every N steps (0: only before and after training)."""
    val_group_size: int = Field(1, ge=1)
    save_every: int | Literal["auto"] = "auto"
    """Checkpoint every N steps; 0: only at the end and when the run stops early (a signal, an agent
    server gone). auto: after the first step, then whenever the time since the last checkpoint is
    at least 20x what that checkpoint took (so checkpoints cost at most ~5% of the run)."""
    incomplete_groups: Literal["keep", "drop"] = "keep"
    """A group with failed or timed-out members: keep the rest (advantages among them) or drop it."""

    # advantages and losses
    advantage_method: str = "group_based"
    normalize_std: bool = True
    gamma: float = Field(1.0, ge=0, le=1)
    loss_fn: str = "ppo"
    clip_low_threshold: float = Field(0.8, gt=0)
    clip_high_threshold: float = Field(1.2, gt=0)
    clip_ratio_c: float | None = None
    ratio_level: Literal["token", "sequence"] = "token"
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                           "seq-mean-token-sum-norm"] = "token-mean"
    loss_agg_norm: float | None = None
    tis_cap: float | None = None
    kl_coef: float = Field(0.0, ge=0)
    """KL penalty to the reference policy (the RL start; with LoRA, the base without adapters)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"

    # sampling
    temperature: float = Field(1.0, ge=0)
    sampling_top_p: float = Field(1.0, gt=0, le=1)
    sampling_max_tokens: int = Field(256, ge=1)

    # evaluation
    pass_k_values: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    success_threshold: float = 1.0

    # optimizer
    learning_rate: float = Field(1e-5, gt=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per forward/backward; gradients accumulate over a step (memory knob only)."""
    num_substeps: int = Field(1, ge=1)
    """Optimizer steps per batch of rollouts."""
    lora: bool = False
    """Train LoRA adapters (also implied by `lora_rank` > 0) of the managed service's rank 32, alpha 64."""
    lora_rank: int = Field(0, ge=0)
    """LoRA rank (0: 32 with `lora`, else full fine-tuning)."""
    lora_alpha: int | None = Field(None, ge=1)
    """LoRA scale numerator (update alpha / rank * B A); None: 2 x rank."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay of the learning rate over the RL optimizer steps, after the warmup."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup from 0 to `learning_rate`."""

    model: ModelConfig = ModelConfig()
    sampler: SamplerConfig = SamplerConfig()
    trainer: TrainerConfig = TrainerConfig()
    tinker: TinkerConfig = TinkerConfig()
    data: DataConfig = DataConfig()
    agent: AgentConfig = AgentConfig()
    warm_start: WarmStartConfig = WarmStartConfig()
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    sandbox: SandboxConfig = SandboxConfig()
    async_config: AsyncConfig = AsyncConfig()
    eval: EvalConfig = EvalConfig()
    verify: VerifyConfig = VerifyConfig()

    def sampling_params(self, *, greedy: bool = False) -> SamplingParams:
        return SamplingParams(temperature=0.0 if greedy else self.temperature,
                              top_p=1.0 if greedy else self.sampling_top_p, max_tokens=self.sampling_max_tokens)

    def inference_params(self, *, greedy: bool = False) -> dict[str, float | int]:
        """The sampling settings sent to agents with each rollout (`inference_params`)."""
        p = self.sampling_params(greedy=greedy)
        return {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens}

    def loss_options(self) -> LossOptions:
        return LossOptions(
            clip_low_threshold=self.clip_low_threshold, clip_high_threshold=self.clip_high_threshold,
            clip_ratio_c=self.clip_ratio_c, ratio_level=self.ratio_level, loss_agg_mode=self.loss_agg_mode,
            loss_agg_norm=self.loss_agg_norm, tis_cap=self.tis_cap, kl_coef=self.kl_coef, kl_estimator=self.kl_estimator)

    def advantage_options(self) -> AdvantageOptions:
        return AdvantageOptions(normalize_std=self.normalize_std, gamma=self.gamma)

    def public_dump(self) -> dict[str, Any]:
        """The config as JSON-able data with its secrets (runtime API keys, the Tinker key) masked:
        what goes to MLflow. The run directory's own `config.yaml` keeps them, for resume."""
        data = self.model_dump(mode="json")
        keys = data["runtime"]["api_keys"]
        data["runtime"]["api_keys"] = ["***" if isinstance(k, str) else {**k, "key": "***"} for k in keys]
        if data["tinker"]["api_key"] is not None:
            data["tinker"]["api_key"] = "***"
        return data

    def lora_sizes(self) -> tuple[int, int] | None:
        """(rank, alpha) of the LoRA adapters, or None for full fine-tuning."""
        rank = self.lora_rank or (32 if self.lora else 0)
        return (rank, self.lora_alpha or 2 * rank) if rank else None


PATH_KEYS = (("data", "train_path"), ("data", "val_path"), ("data", "test_path"),
             ("warm_start", "demos_path"), ("model", "path"), ("verify", "production_schemas"))
"""(section, key) of the config's file paths: relative ones resolve against the config file."""


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML file (optional), apply `a.b=c` overrides, validate.

    Relative paths in the file (data, demos, model) are taken relative to the file.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        raw = loaded
        base = path.resolve().parent
        for section, key in PATH_KEYS:
            value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                raw[section][key] = str(base / value)
    for item in overrides:
        _apply_override(raw, item)
    cfg = validate_config(raw)
    check_algorithms(cfg)
    return cfg


def default_sampling_params(**overrides: Any) -> SamplingParams:
    """`JobConfig()`'s sampling params with `overrides` (for code that has no job config)."""
    return dataclasses.replace(JobConfig().sampling_params(), **overrides)


def default_loss_options(**overrides: Any) -> LossOptions:
    """`JobConfig()`'s loss options with `overrides`."""
    return dataclasses.replace(JobConfig().loss_options(), **overrides)


def default_advantage_options(**overrides: Any) -> AdvantageOptions:
    """`JobConfig()`'s advantage options with `overrides`."""
    return dataclasses.replace(JobConfig().advantage_options(), **overrides)


def check_algorithms(cfg: JobConfig) -> None:
    """Import `plugins`, then check `loss_fn` and `advantage_method` against the registries (so a
    misspelling fails now, not after the warm start). A python agent's module may register them
    too: it is imported when a name is not found otherwise."""
    import importlib
    import sys

    from turnwise.algo.advantages import ADVANTAGES
    from turnwise.algo.losses import LOSSES

    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    for module in cfg.plugins:
        try:
            importlib.import_module(module)
        except Exception as e:  # a user module: any failure is a config error
            raise ConfigError(f"plugins: cannot import {module!r}: {type(e).__name__}: {e}") from None
    checks = ((cfg.loss_fn, LOSSES, "loss_fn"), (cfg.advantage_method, ADVANTAGES, "advantage_method"))
    if any(name not in registry for name, registry, _ in checks) and cfg.agent.kind == "python" \
            and cfg.agent.function and ":" in cfg.agent.function:
        try:
            importlib.import_module(cfg.agent.function.partition(":")[0])
        except Exception as e:  # reported by the agent loader with its own message
            raise ConfigError(f"agent.function: cannot import {cfg.agent.function!r}: {type(e).__name__}: {e}") \
                from None
    for name, registry, key in checks:
        if name not in registry:
            close = difflib.get_close_matches(name, registry.names(), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{key}: unknown name {name!r}; {hint}valid names: {', '.join(registry.names())} "
                              f"(register your own in a module listed in `plugins`)")


def validate_config(raw: Mapping[str, Any]) -> JobConfig:
    _check_keys(raw, JobConfig, "")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        parts = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                 for err in e.errors()]
        raise ConfigError("invalid config: " + "; ".join(parts)) from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _check_keys(raw: Mapping[str, Any], model: type[BaseModel], prefix: str) -> None:
    fields = model.model_fields
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {prefix}{key!r} must be a section (a mapping)")
            _check_keys(value, annotation, f"{prefix}{key}.")
