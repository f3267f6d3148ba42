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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from turnwise.types import AdvantageOptions, LossOptions, SamplingParams


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and why."""


class RunStopped(RuntimeError):
    """A run stopped early on purpose (an agent server that stayed down, ...), after saving a
    checkpoint; the message says why and how to resume. The CLI prints it as one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelConfig(_Section):
    """Shape of the built-in tiny model (a Qwen2 causal LM with our own BPE tokenizer)."""

    vocab_size: int = Field(2048, ge=300, description="BPE vocabulary, special tokens included")
    hidden_size: int = Field(256, ge=8)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(8, ge=1)
    num_key_value_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    max_position_embeddings: int = Field(4096, ge=64)
    seed: int = 0


class ModelConfig(_Section):
    path: str | None = None
    """A local Hugging Face model directory; None builds (once) and uses the built-in tiny model."""
    tiny: TinyModelConfig = TinyModelConfig()
    cache_dir: str = "~/.cache/turnwise/models"
    """Where the built-in tiny model is written, keyed by its config."""
    chat_format: Literal["auto", "hermes", "qwen3", "qwen3_xml", "llama3", "mistral", "gpt_oss", "gemma4",
                         "deepseek_v3", "kimi_k2", "glm4"] = "auto"
    """The model family (tool-call and reasoning format, end-of-turn tokens); auto detects it from
    the chat template (`turnwise.policy.renderers.families`)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the learner and the local sampler run; auto: CUDA when present, else the CPU."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; auto: bfloat16 on CUDA, float32 on the CPU. Trained weights and Adam stay fp32."""


class TrainerConfig(_Section):
    """The learner: one process (`nproc` 1) or FSDP2 data parallel over `nproc` ranks."""

    nproc: int = Field(1, ge=1)
    """Learner ranks (gloo on the CPU, nccl on CUDA, a GPU each); rank 0 is the turnwise process."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (less memory, ~30% more compute)."""


class VLLMConfig(_Section):  # sampler.backend vllm: `vllm serve` replicas on loopback, or running servers
    replicas: int = Field(1, ge=1, description="servers started, each on a free loopback port")
    python: str = Field(".venv-vllm/bin/python", description="interpreter with vLLM (`make vllm`; GPUs: `vllm`)")
    args: list[str] = Field([], description="extra `vllm serve` engine arguments; the environment is inherited")
    urls: list[str] = Field([], description="attach instead (VLLM_SERVER_DEV_MODE=1, shared filesystem)")
    max_retries: int = Field(2, ge=0, description="tries on another replica after one failed (sampler/retries)")


class SamplerConfig(_Section):
    backend: Literal["local", "vllm"] = Field("local", description="local: in process; vllm: `sampler.vllm`")
    max_batch_size: int = Field(64, ge=1, description="most sequences decoded together (local engine)")
    vllm: VLLMConfig = VLLMConfig()


class DataConfig(_Section):
    train_path: str | None = None
    """Task file (JSONL, Parquet or CSV) for training."""
    val_path: str | None = None
    """Task file for validation (temperature 0)."""
    test_path: str | None = None
    """Held-out task file for `turnwise eval`."""
    shuffle: bool = True


class AgentConfig(_Section):
    kind: Literal["python", "http", "worker"] = "python"
    """python: an in-process async function; http: push to an agent server's POST {url}/rollout;
    worker: queue tasks on the runtime for pull workers (`turnwise worker`)."""
    function: str | None = None
    """`module:function` of the agent: async def agent(task, client, ctx) -> reward (kind python)."""
    url: str | None = None
    """Agent server root, e.g. http://127.0.0.1:8080 (kind http; it serves /rollout and /health)."""
    api_key: str | None = None
    """Bearer key the agent server requires on /rollout (its inbound_api_key; kind http)."""
    endpoint: str | None = None
    """Runtime URL as agents reach it (kinds http, worker). None: the runtime's own URL (http),
    the URL the worker leased from (worker)."""
    concurrency: int = Field(64, ge=1)
    """Most rollouts running at once (kinds python, http; workers set their own)."""
    rollout_timeout: float = Field(300.0, gt=0)
    """Seconds before a rollout counts as failed."""
    queue_timeout: float = Field(600.0, gt=0)
    """Kind worker: seconds with rollouts queued and no worker leasing any before the queued ones
    fail, so a step never waits forever on workers that are not there. Above rollout_timeout."""
    rollout_max_retries: int = Field(2, ge=0)
    """Fresh attempts, each with a new trajectory id, after a rollout that never ran its course:
    http: connection error, HTTP 429/5xx or timeout; worker: the worker died (its lease expired)."""
    retry_backoff: float = Field(0.5, gt=0)
    """Kind http: seconds before the first retry, doubled for each next one, with +-50% jitter
    (each wait at most `rollout_timeout`)."""
    unavailable_timeout: float = Field(300.0, gt=0)
    """Kind http: an agent server that is down (GET /health fails) pauses dispatch for up to this
    many seconds; then the run stops with a checkpoint and a one-line message."""


class WarmStartConfig(_Section):
    """Supervised warm start (cross_entropy on assistant tokens of demonstrations) before RL."""

    demos_path: str | None = None
    """JSONL of {"messages": [...], "tools": [...]}; None skips the warm start."""
    epochs: int = Field(1, ge=0)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay over the warm start's steps (after warmup)."""
    warmup_steps: int = Field(10, ge=0)


class TrackingConfig(_Section):
    mlflow: bool = True
    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI when set, else a SQLite store under output_dir."""
    experiment: str = "turnwise"
    progress: bool = True
    """Rich progress bars when stdout is a terminal."""
    console: Literal["auto", "on", "off"] = "auto"
    """A plain line per RL step (and every tenth of the warm start) on stdout; auto: when stdout
    is not a terminal (CI logs, nohup, `make demo > log.txt`)."""
    traces: bool = True
    """Log a sample of each step's rollouts as MLflow traces (a span per turn and per tool call)."""
    traces_per_step: int | None = Field(2, ge=0)
    """Groups per step logged as traces (all their rollouts); None: every group. Each step also
    logs a table of all its rollouts (task, final output, expected, reward, verdict)."""
    log_checkpoints: bool = True
    """Log checkpoint weights as MLflow artifacts (and register the final model)."""
    register_model: str | None = None
    """Registered-model name for the final checkpoint; None: `turnwise-<name>`."""


class ApiKeyConfig(_Section):
    """A bearer key that reaches only one job."""

    key: str = Field(min_length=8)
    job: str = Field(min_length=1)


class RuntimeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    """0 picks a free port."""
    api_keys: tuple[Annotated[str, Field(min_length=8)] | ApiKeyConfig, ...] = ()
    """Bearer keys (8+ characters); required when binding beyond loopback. A plain string acts on
    the server's own job; `{key: ..., job: ...}` reaches only that job (turnwise.runtime.auth)."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_long_enough(cls, keys: Any) -> Any:
        items = keys if isinstance(keys, list | tuple) else [keys]
        for i, k in enumerate(items):
            key = k.get("key") if isinstance(k, Mapping) else k
            if isinstance(key, str) and len(key) < 8:
                raise ValueError(f"each API key must be at least 8 characters (key {i + 1} has {len(key)})")
        return keys

    sampling_overrides: Literal["allow", "deny", "warn"] = "warn"
    """A registered rollout's request that sets temperature/top_p/max_tokens other than the job's:
    allow: the request's win; warn: the job's win, logged once per value; deny: refused (400).
    Each case is counted (`/jobs/{id}/stats` sampling_overrides)."""
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    opaque_tokens_on_loopback: bool = False
    """With api_keys: also accept unknown bearer tokens from loopback peers (the managed agent
    SDK's signed AWS tokens, which turnwise cannot verify); see turnwise.runtime.auth."""

    def own_key(self) -> str | None:
        """The key the trainer's own clients send: the first plain key, else the first key's."""
        plain = [k for k in self.api_keys if isinstance(k, str)]
        return plain[0] if plain else (self.api_keys[0].key if self.api_keys else None)  # type: ignore[union-attr]


class SandboxConfig(_Section):
    require_isolation: bool = True
    """Refuse to run sandboxed code without bubblewrap; false runs the weaker layers (recorded in
    each result's `isolation`). Exported to the environment as TURNWISE_SANDBOX_REQUIRE_ISOLATION."""

    def export(self) -> None:
        """Make `turnwise.env.sandbox` (in this process and those it starts) follow this setting."""
        import os

        os.environ["TURNWISE_SANDBOX_REQUIRE_ISOLATION"] = "1" if self.require_isolation else "0"


class AsyncConfig(_Section):
    max_steps_off_policy: int = Field(0, ge=0)
    """0 = synchronous: every rollout of a step is sampled by the current weights. k > 0: sampling
    continues while the trainer updates; a group whose oldest token is more than k policy versions
    behind the weights it would train is dropped (`train/dropped_stale`)."""


class EvalConfig(_Section):
    """`turnwise eval`: held-out tasks (`data.test_path`) scored by a grader, not the training reward."""

    group_size: int = Field(4, ge=1)
    """Trials per task (n of pass@k and pass^k)."""
    grader: Literal["exact_match", "lenient_match", "field_accuracy", "reward"] = "exact_match"
    """Scores the last assistant message against `task[answer_key]`; `reward`: the agent's own reward."""
    answer_key: str = "answer"
    """Task field holding the ground-truth JSON object."""
    temperature: float | None = Field(None, ge=0)
    """None: the top-level `temperature`."""
    top_p: float | None = Field(None, gt=0, le=1)
    """None: `sampling_top_p`."""
    max_tokens: int | None = Field(None, ge=1)
    """None: `sampling_max_tokens`."""
    max_tasks: int | None = Field(None, ge=1)
    """Evaluate only the first N test tasks."""
    gate: dict[str, float | str] = Field(default_factory=dict)
    """Deployment gate, `{metric: threshold}`: a number means >=; or a string "<= 0.2", "> 0.5".
    With `--compare`, `delta/<metric>` gates on B - A. Any failed check makes the exit code 1."""
    bootstrap_samples: int = Field(1000, ge=0)
    """Paired bootstrap resamples of tasks for the confidence intervals of `--compare` (0: none)."""
    confidence: float = Field(0.95, gt=0, lt=1)


class VerifyConfig(_Section):
    """`turnwise verify`: is the environment fit for training? (contract in `turnwise.eval.verify`)"""

    tasks: int = Field(8, ge=1)
    """Tasks sampled (with `seed`) from `data.train_path`, each run, replayed and scored."""
    concurrency: int = Field(32, ge=1)
    """Rollouts run at once in the isolation check."""
    production_schemas: str | None = None
    """JSON or YAML file of the production tool schemas; None skips the schema check."""
    tools: str | None = None
    """`module:attr`, a ToolBox or list of tool schemas; None: the tools the agent offered the model."""
    oracle_agent: str | None = None
    """`module:function` with the agent's signature that should reach `success_threshold`; None skips."""
    null_agent: str | None = None
    """`module:function` that should score 0; None: the job's agent with a policy that replies nothing."""


class JobConfig(_Section):
    """Everything a training or evaluation job needs."""

    name: str = "turnwise"
    output_dir: str = "runs"
    seed: int = 0
    plugins: tuple[str, ...] = ()
    """Modules imported when the config loads, e.g. ones that `@register_loss` or
    `@register_advantage` (the agent may run elsewhere, so its module is not enough)."""

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

    def lora_sizes(self) -> tuple[int, int] | None:
        """(rank, alpha) of the LoRA adapters, or None for full fine-tuning."""
        rank = self.lora_rank or (32 if self.lora else 0)
        return (rank, self.lora_alpha or 2 * rank) if rank else None


_PATH_KEYS = (("data", "train_path"), ("data", "val_path"), ("data", "test_path"),
              ("warm_start", "demos_path"), ("model", "path"), ("verify", "production_schemas"))


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
        for section, key in _PATH_KEYS:
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
