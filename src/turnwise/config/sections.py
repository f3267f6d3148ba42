"""The sections of `turnwise.config.JobConfig`: one frozen pydantic model per engine or plumbing
concern (model, trainer, sampler, tinker, data, agent, warm start, tracking, runtime, sandbox,
async, eval, verify), and the errors a config raises. Defaults live here and in `JobConfig`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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

    backend: Literal["local", "tinker"] = "local"
    """tinker: a Tinker-API service trains LoRA adapters (rank `lora_rank`, else 32; section `tinker`)."""
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
    backend: Literal["local", "vllm", "tinker"] = Field(
        "local", description="local: in process; vllm: `sampler.vllm`; tinker: the service's (section `tinker`)")
    max_batch_size: int = Field(64, ge=1, description="most sequences decoded together (local engine)")
    vllm: VLLMConfig = VLLMConfig()


class TinkerConfig(_Section):
    """A Tinker-API service (`turnwise.policy.tinker`); `model.path`: the model's tokenizer, locally."""

    base_url: str | None = None  # None: $TINKER_BASE_URL, else Thinking Machines' service
    api_key: str | None = None  # None: $TINKER_API_KEY
    base_model: str | None = None  # the service's name of the model trained, e.g. Qwen/Qwen3-8B
    loss_reduction: Literal["sum", "sequence_mean"] = "sum"
    """How the service reduces a built-in loss over a call's datums. sum: every datum's per-token
    terms summed (Tinker's documented semantics); sequence_mean: each datum's sum divided by its
    weight sum (all its targets, as turnwise sends no weights to the RL losses), then the mean over
    the datums of the optimizer step (SkyRL 0.3's JAX backend). turnwise scales the advantages so
    that either gives its own loss; with sequence_mean, cross_entropy's weights cancel out (each
    sequence's token mean, averaged) and `forward_backward_custom` cannot work, so only the RL
    built-ins' options are accepted."""


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
    """Runtime URL as agents reach it (http, worker); None: the runtime's own, the leased one (worker)."""
    concurrency: int = Field(64, ge=1)
    """Most rollouts running at once (kinds python, http; workers set their own)."""
    rollout_timeout: float = Field(300.0, gt=0)
    """Seconds before a rollout counts as failed."""
    queue_timeout: float = Field(600.0, gt=0)
    """Kind worker: seconds with rollouts queued and no worker leasing any before they fail (> rollout_timeout)."""
    rollout_max_retries: int = Field(2, ge=0)
    """Fresh attempts, each with a new trajectory id, after a rollout that never ran its course:
    http: connection error, HTTP 429/5xx or timeout; worker: the worker died (its lease expired)."""
    retry_backoff: float = Field(0.5, gt=0)
    """Kind http: seconds before the first retry, doubled each time (+-50% jitter, <= rollout_timeout)."""
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
    """A plain line per RL step (and every tenth of the warm start); auto: when stdout is no terminal."""
    traces: bool = True
    """Log a sample of each step's rollouts as MLflow traces (a span per turn and per tool call)."""
    traces_per_step: int | None = Field(2, ge=0)
    """Groups per step logged as traces (all their rollouts; None: all); a table lists every rollout."""
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
    """Bearer keys (8+ characters), required beyond loopback: a string acts on the server's own job,
    `{key: ..., job: ...}` (or a mapping `{key: job_id}`) reaches only that job (turnwise.runtime.auth)."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_long_enough(cls, keys: Any) -> Any:
        if isinstance(keys, Mapping):  # `{key: job_id}`, the form `turnwise.runtime.auth` also takes
            keys = [{"key": k, "job": j} for k, j in keys.items()]
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
    """With api_keys: also accept unknown bearer tokens from loopback peers (turnwise.runtime.auth)."""

    def own_key(self) -> str | None:
        """The key the trainer's own clients send: the first plain key, else the first key's."""
        plain = [k for k in self.api_keys if isinstance(k, str)]
        return plain[0] if plain else (self.api_keys[0].key if self.api_keys else None)  # type: ignore[union-attr]


class SandboxConfig(_Section):
    require_isolation: bool = True
    """Refuse to run sandboxed code without bubblewrap; false runs the weaker layers (each result's
    `isolation`). Exported as TURNWISE_SANDBOX_REQUIRE_ISOLATION."""

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
    """Deployment gate `{metric: threshold}` (a number means >=; or "<= 0.2", "> 0.5"; with `--compare`,
    `delta/<metric>` gates on B - A); any failed check makes the exit code 1."""
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
