"""Every data contract that crosses a module boundary.

Frozen dataclasses, no torch. Shape suffixes name dimensions: `_T` tokens of one sequence,
`_G` members of a group, `_D` datums of a batch, `_B_T` a padded batch of sequences.
Pydantic appears only where bytes enter or leave (HTTP bodies in `runtime`, files in `config`).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """One function call requested by the model, in OpenAI's shape."""

    id: str
    """Call id; tool results refer to it with `tool_call_id`."""
    name: str
    """Function name."""
    arguments: str
    """Arguments as JSON text, exactly as produced (never re-serialized)."""

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Message:
    """One chat message in OpenAI's shape."""

    role: str
    """system | user | assistant | tool."""
    content: str = ""
    """Text content ("" when an assistant message only calls tools)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls requested by an assistant message."""
    tool_call_id: str | None = None
    """For a tool message: the call it answers."""
    name: str | None = None
    """For a tool message: the tool's name (optional in OpenAI's protocol)."""
    reasoning_content: str = ""
    """For an assistant message: its reasoning (`<think>`, harmony analysis), apart from `content`."""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning_content:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    def to_template(self) -> dict[str, Any]:
        """The dict a chat template renders: tool-call arguments as parsed objects."""
        out = self.to_openai()
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": _parse_json_or_text(c.arguments)}}
                for c in self.tool_calls
            ]
        return out

    def same_as(self, other: Message) -> bool:
        """Equal as a conversation turn: tool-call JSON compared by value, not by formatting.

        Reasoning is not compared: agents often drop it, and the stored tokens keep it anyway."""
        if (self.role, self.content, self.tool_call_id) != (other.role, other.content, other.tool_call_id):
            return False
        if len(self.tool_calls) != len(other.tool_calls):
            return False
        return all(
            a.name == b.name and _parse_json_or_text(a.arguments) == _parse_json_or_text(b.arguments)
            for a, b in zip(self.tool_calls, other.tool_calls, strict=True)
        )


def _parse_json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


@dataclass(frozen=True)
class Task:
    """One task row from a task file."""

    id: str
    """Stable id (the row's `id` field, or its index in the file)."""
    row: Mapping[str, Any]
    """The row as loaded; the agent receives it unchanged."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion (defaults live in `JobConfig` alone)."""

    temperature: float
    """0 means greedy."""
    top_p: float
    """Nucleus mass kept."""
    max_tokens: int
    """Most completion tokens."""
    stop: tuple[str, ...] = ()
    """Stop strings: sampling ends at the token that completes one; the returned text omits it."""
    seed: int | None = None
    """Per-request seed for reproducible sampling."""
    grammar: str | None = None
    """An llguidance grammar (Lark with `%json`) the completion must match, from `policy.grammars`; None:
    unconstrained. Only samplers with `supports_grammar` honour it (the runtime refuses it otherwise)."""
    top_logprobs: int = 0
    """Also return the k most likely tokens at each position (0..20), from the sampled token's distribution."""


@dataclass(frozen=True)
class SampleContext:
    """Which rollout a prompt belongs to: the runtime passes it as `context=` to a sampler that
    accepts it, so a scripted policy can answer per task without the agent marking its prompts."""

    trajectory_id: str
    """The trajectory the prompt belongs to (the request's header)."""
    task_id: str | None
    """The task the dispatcher began the trajectory for; None for one it did not begin."""
    turn: int
    """Index of the turn being sampled (0 for the first model call)."""


class FinishReason(str, enum.Enum):
    """Why the sampler ended a completion."""

    STOP = "stop"
    """An end-of-turn token or a stop string."""
    LENGTH = "length"
    """max_tokens reached (or the model's context)."""


@dataclass(frozen=True)
class Completion:
    """What the sampler returns for one request."""

    token_ids: tuple[int, ...]
    """Sampled token ids, including the end-of-turn token when one was sampled."""
    logprobs: tuple[float, ...]
    """Logprob of each sampled token under the temperature-scaled policy (raw logits when greedy), over
    the tokens the grammar allowed when constrained (`policy.constrain`)."""
    finish_reason: FinishReason
    """Why it ended."""
    version: int
    """Policy version (weights) that sampled every token of this completion."""
    prompt_tokens: int = 0
    """Prompt tokens the sampler computed (prefill), excluding any reused prefix KV."""
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()
    """Per sampled token, (id, logprob) of the `SamplingParams.top_logprobs` most likely ones; () when not asked."""


class FailureKind(str, enum.Enum):
    """Why a rollout failed; carried with its message on every FAILED trajectory. Metrics and
    eval count these (`rollout/failed_<kind>`, `eval/stop/<kind>`), never the message text."""

    AGENT_ERROR = "agent_error"
    """The agent raised, or reported complete-rollout with status failed."""
    AGENT_TIMEOUT = "timeout"
    """The rollout ran past `agent.rollout_timeout`."""
    QUEUE_TIMEOUT = "queue_timeout"
    """No pull worker leased the rollout within `agent.queue_timeout`."""
    NO_MODEL_CALL = "no_model_call"
    """The agent finished without calling the model."""
    BAD_REWARD = "bad_reward"
    """The agent returned something that is not a finite reward (or per-turn rewards of the wrong length)."""
    NO_REWARD = "no_reward"
    """The agent completed the rollout but never sent update-reward."""
    TRANSPORT = "transport"
    """The agent server could not be reached, or answered an error (HTTP 4xx/5xx)."""
    WORKER_LOST = "worker_lost"
    """The pull worker holding the rollout stopped heartbeating."""
    ABANDONED = "abandoned"
    """The trainer stopped (killed, interrupted) while the rollout ran."""


class StopReason(str, enum.Enum):
    """Why a trajectory or tool loop ended (the `rollout/stop_<reason>` metric)."""

    FINAL_ANSWER = "final_answer"
    """The model replied without calling a tool."""
    MAX_TURNS = "max_turns"
    """The turn limit was reached while the model still called tools."""
    MAX_TOKENS = "max_tokens"
    """A reply was cut by its token limit (finish_reason "length")."""
    TERMINAL_TOOL = "terminal_tool"
    """A tool that ends the episode (`@tool(terminal=True)`) was called."""
    ERROR = "error"
    """A chat request failed."""


class TrajectoryStatus(str, enum.Enum):
    """Lifecycle of a rollout. Allowed moves are in `TRAJECTORY_TRANSITIONS`: the agent completes an
    IN_PROGRESS one (ready | failed) and rewards a READY one; the trainer may fail a READY one
    that never got its reward (`TrajectoryStore.fail`), and on resume abandons every trajectory of
    the step that was cut short (`TrajectoryStore.abandon_after`)."""

    IN_PROGRESS = "in_progress"
    READY = "ready"
    FAILED = "failed"
    REWARDED = "rewarded"
    ABANDONED = "abandoned"
    """Sampled for a step that never finished (the trainer died); counted apart, never trained."""


TRAJECTORY_TRANSITIONS: Mapping[TrajectoryStatus, frozenset[TrajectoryStatus]] = {
    TrajectoryStatus.IN_PROGRESS: frozenset({TrajectoryStatus.READY, TrajectoryStatus.FAILED,
                                             TrajectoryStatus.ABANDONED}),
    TrajectoryStatus.READY: frozenset({TrajectoryStatus.REWARDED, TrajectoryStatus.FAILED,
                                       TrajectoryStatus.ABANDONED}),
    TrajectoryStatus.FAILED: frozenset({TrajectoryStatus.ABANDONED}),
    TrajectoryStatus.REWARDED: frozenset({TrajectoryStatus.ABANDONED}),
    TrajectoryStatus.ABANDONED: frozenset(),
}


@dataclass(frozen=True)
class Turn:
    """One sampled assistant turn, recorded token-exactly by the runtime."""

    index: int
    """0-based position in the trajectory."""
    prompt_ids: tuple[int, ...]
    """The full prompt the sampler processed for this turn."""
    completion_ids: tuple[int, ...]
    """Sampled token ids."""
    logprobs: tuple[float, ...]
    """Sampler logprob of each completion token."""
    version: int
    """Policy version that sampled this turn."""
    finish_reason: FinishReason
    """Why sampling ended."""
    message: Message
    """The assistant message returned to the agent (parsed tool calls)."""
    tool_parse_error: bool = False
    """The completion looked like a tool call but could not be parsed; it was returned as text."""
    reused_prompt_tokens: int = 0
    """Leading prompt tokens taken from the stored conversation instead of re-tokenized."""
    request_messages: tuple[Message, ...] = ()
    """The messages the agent sent for this turn."""
    prompt_plan: str = ""
    """Why the prompt was built as it was (a `runtime.capture.PlanReason` value: first, extends, rewritten, ...)."""
    started_at: float = 0.0
    """Wall-clock time (Unix seconds) the request for this turn reached the runtime; 0 when unknown."""
    ended_at: float = 0.0
    """Wall-clock time the sampled turn was recorded; 0 when unknown."""


@dataclass(frozen=True)
class TurnView:
    """One model call as an evaluation saw it: the embedded runtime (from its recorded turn) or an
    external endpoint (from the exchange, without token ids)."""

    request_messages: tuple[Message, ...]
    """Messages the agent sent."""
    message: Message
    """The assistant message returned."""
    finish_reason: str
    """stop | length | tool_calls (endpoint)."""
    completion_tokens: int
    """Sampled tokens."""
    prompt_tokens: int
    """Prompt tokens (the full prompt, reused prefix included)."""
    tool_parse_error: bool = False
    """The completion looked like a tool call that could not be parsed."""


@dataclass(frozen=True)
class Trajectory:
    """One rollout: every turn of one agent run on one task, plus its outcome."""

    id: str
    """Trajectory id (the header's value)."""
    job_id: str
    """Job it belongs to."""
    status: TrajectoryStatus
    """Lifecycle state."""
    turns: tuple[Turn, ...] = ()
    """Sampled turns in order."""
    rewards: tuple[float, ...] = ()
    """One value for the whole rollout, or one per turn; empty until rewarded."""
    tools: tuple[Mapping[str, Any], ...] = ()
    """OpenAI tool schemas the agent offered (from the first turn)."""
    error: str | None = None
    """Why it failed, when it did (for people; code reads `failure`)."""
    failure: FailureKind | None = None
    """The kind of failure, when it failed."""
    task_id: str | None = None
    """The task it was run on (`Task.id`), as the dispatcher recorded it; None when none did."""

    @property
    def reward(self) -> float:
        """Scalar outcome: the single reward, or the sum of per-turn rewards."""
        return float(sum(self.rewards))


@dataclass(frozen=True)
class Segment:
    """One training sequence cut from a trajectory: consecutive turns whose tokens extend each other."""

    trajectory_id: str
    """Source trajectory."""
    tokens_T: tuple[int, ...]
    """Every token the sampler processed or produced, in order."""
    loss_mask_T: tuple[int, ...]
    """1 on sampled tokens, 0 on prompt and tool-result tokens."""
    logprobs_T: tuple[float, ...]
    """Sampler logprob on sampled tokens, 0.0 elsewhere."""
    turn_T: tuple[int, ...]
    """Turn index of each sampled token, -1 elsewhere."""
    versions_T: tuple[int, ...]
    """Policy version of each sampled token, -1 elsewhere."""


@dataclass(frozen=True)
class RolloutResult:
    """What the dispatcher learned from running one agent on one task."""

    task: Task
    """The task."""
    trajectory: Trajectory
    """The recorded trajectory (after complete-rollout and update-reward)."""
    seconds: float
    """Wall time of the agent run."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Numbers the agent or its reward reported (tool calls, tool errors, ...)."""
    state: Any = None
    """The final environment state the agent returned (`AgentResult.state`), for verify."""
    retried: tuple[FailureKind, ...] = ()
    """Why each earlier attempt failed and was retried (push and pull dispatch)."""


@dataclass(frozen=True)
class AgentResult:
    """What an agent run returns: its reward(s) and, optionally, numbers and the final state."""

    rewards: tuple[float, ...]
    """One finite value for the whole rollout, or one per turn."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Per-rollout numbers (tool calls, tool errors, stop reason, ...)."""
    state: Any = None
    """A JSON-able final state (`episode.state_snapshot()`), compared by `turnwise verify`."""


@dataclass(frozen=True)
class Group:
    """The `group_size` rollouts of one task; advantages compare within it."""

    task: Task
    """The shared task."""
    rollouts_G: tuple[RolloutResult, ...]
    """Its rollouts."""


@dataclass(frozen=True)
class Datum:
    """One segment with its per-token advantages: the unit the loss consumes."""

    segment: Segment
    """Tokens, mask and behavior logprobs."""
    advantages_T: tuple[float, ...]
    """Advantage of each token (0 where the mask is 0)."""
    trainer_logprobs_T: tuple[float, ...] | None = None
    """The trainer's logprobs before this step's first update (truncated importance sampling over
    several substeps); None: taken from the forward pass itself."""


@dataclass(frozen=True)
class Batch:
    """Everything one optimizer step trains on."""

    datums_D: tuple[Datum, ...]
    """Training sequences."""
    groups: tuple[Group, ...]
    """The groups they came from."""


@dataclass(frozen=True)
class LossOptions:
    """Knobs of the policy losses (names as in the config; defaults live in `JobConfig` alone)."""

    clip_low_threshold: float
    """Lower bound on the importance ratio r."""
    clip_high_threshold: float
    """Upper bound on the importance ratio r."""
    clip_ratio_c: float | None
    """Dual-clip bound for negative advantages (PPO only); None disables it."""
    ratio_level: str
    """token | sequence (GSPO: geometric mean of token ratios per sequence)."""
    loss_agg_mode: str
    """token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm."""
    loss_agg_norm: float | None
    """Fixed normalizer for seq-mean-token-sum-norm (Dr. GRPO); None = max_tokens of the batch."""
    tis_cap: float | None
    """Truncated importance-sampling cap on exp(logp_trainer_old - logp_sampler); None disables it."""
    kl_coef: float
    """Weight of the KL penalty to the reference policy, added to the loss; 0 disables it."""
    kl_estimator: str
    """k1 | k2 | k3: Schulman's per-token estimators of KL(policy || reference)."""


@dataclass(frozen=True)
class AdamParams:
    """One `optim_step`'s AdamW settings (Tinker's `AdamParams`, plus clipping and decay)."""

    learning_rate: float
    """This step's learning rate (the caller applies the schedule)."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""


@dataclass(frozen=True)
class AdvantageOptions:
    """Knobs of the advantage estimators (defaults live in `JobConfig` alone)."""

    normalize_std: bool
    """Divide by the group std (GRPO); False gives Dr. GRPO."""
    gamma: float
    """Discount for per-turn and token-level returns."""
    eps: float = 1e-6
    """Added to standard deviations."""


@dataclass(frozen=True)
class ScoredRollout:
    """The inputs an advantage estimator needs about one rollout."""

    group_id: str
    """Rollouts with the same group id are compared with each other."""
    trajectory_id: str
    """For error messages."""
    rewards: tuple[float, ...]
    """One value, or one per turn."""
    completion_lengths: tuple[int, ...]
    """Sampled tokens in each turn."""


def json_dumps_canonical(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def as_messages(raw: Sequence[Mapping[str, Any]]) -> tuple[Message, ...]:
    """OpenAI message dicts to Messages (tool-call arguments kept as text)."""
    out = []
    for m in raw:
        calls = tuple(
            ToolCall(
                id=str(c.get("id") or f"call_{i}"),
                name=str(c["function"]["name"]),
                arguments=c["function"]["arguments"]
                if isinstance(c["function"].get("arguments"), str)
                else json_dumps_canonical(c["function"].get("arguments", {})),
            )
            for i, c in enumerate(m.get("tool_calls") or ())
        )
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
        reasoning = m.get("reasoning_content") or m.get("reasoning") or ""
        out.append(Message(role=str(m["role"]), content=content or "", tool_calls=calls,
                           tool_call_id=m.get("tool_call_id"), name=m.get("name"),
                           reasoning_content=reasoning if isinstance(reasoning, str) else ""))
    return tuple(out)
