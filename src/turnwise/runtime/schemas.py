"""HTTP bodies of the runtime server (pydantic: only where bytes enter or leave)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from turnwise.types import Message, SamplingParams, TrajectoryStatus, as_messages


class _Open(BaseModel):
    """OpenAI clients send fields we do not use (user, metadata, ...): accept and ignore them."""

    model_config = ConfigDict(extra="allow")


class FunctionCallIn(_Open):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Open):
    id: str | None = None
    type: str = "function"
    function: FunctionCallIn


class MessageIn(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None


class FunctionDefIn(_Open):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolIn(_Open):
    type: Literal["function"] = "function"
    function: FunctionDefIn


class StreamOptionsIn(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    """OpenAI chat completions body (also the managed API's Sample body)."""

    model: str | None = None
    messages: list[MessageIn] = Field(min_length=1)
    tools: list[ToolIn] | None = None
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1, description="Only 1: a trajectory records one completion per turn.")
    stream: bool = False
    stream_options: StreamOptionsIn | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def forced_tools(self) -> tuple[str, ...]:
        """The tools `tool_choice` makes the model call (one or more of them); () when none is forced.
        ValueError naming the field when it cannot be honoured."""
        choice, names = self.tool_choice, [t.function.name for t in self.tools or ()]
        if choice in (None, "auto", "none"):
            return ()
        if choice == "required":
            if not names:
                raise ValueError("tool_choice required: no tools were offered")
            return tuple(names)
        function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise ValueError(f"tool_choice {json.dumps(choice)}: send auto, none, required or "
                             '{"type": "function", "function": {"name": ...}}')
        if name not in names:
            raise ValueError(f"tool_choice names {name!r}, which is not among the offered tools {names}")
        return (name,)

    def response_schema(self) -> dict[str, Any] | None:
        """The JSON schema `response_format` asks the content to match; None for text.
        ValueError naming the field when it is malformed or of an unknown type."""
        rf = self.response_format
        kind = rf.get("type") if rf is not None else "text"
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "object"}
        if kind == "json_schema":
            spec = rf.get("json_schema") if rf is not None else None
            schema = spec.get("schema", {}) if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ValueError("response_format.json_schema.schema must be a JSON schema object")
            return schema
        raise ValueError(f"response_format type {kind!r} is not supported; send text, json_object or json_schema")

    def to_messages(self) -> tuple[Message, ...]:
        raw = []
        for m in self.messages:
            d = m.model_dump(exclude_none=True, include={"role", "content", "tool_calls", "tool_call_id", "name",
                                                              "reasoning_content"})
            if d["role"] == "developer":  # OpenAI's newer name for system
                d["role"] = "system"
            raw.append(d)
        return as_messages(raw)

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def sampling_params(self, default: SamplingParams) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            temperature=default.temperature if self.temperature is None else self.temperature,
            top_p=default.top_p if self.top_p is None else self.top_p,
            max_tokens=self.max_completion_tokens or self.max_tokens or default.max_tokens,
            stop=stop or default.stop,
            seed=default.seed if self.seed is None else self.seed,
        )


class CompleteRolloutRequest(BaseModel):
    """Seal a trajectory (the managed API's CompleteRollout)."""

    model_config = ConfigDict(extra="ignore")

    TrajectoryId: str = Field(min_length=1, max_length=512)
    Status: Literal["ready", "failed"] = Field("ready", description="Defaults to ready, as in the managed service.")
    ClientToken: str | None = Field(None, max_length=512)
    JobArn: str | None = None
    Error: str | None = Field(None, max_length=4096, description="Why it failed (turnwise extension).")

    @field_validator("Status", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    def status(self) -> TrajectoryStatus:
        return TrajectoryStatus(self.Status)


class UpdateRewardRequest(BaseModel):
    """Reward a completed trajectory: one value, or one per turn (the managed API's UpdateReward)."""

    model_config = ConfigDict(extra="ignore")

    TrajectoryId: str = Field(min_length=1, max_length=512)
    Rewards: list[Annotated[float, Field(strict=True)]] = Field(
        min_length=1, description="Finite numbers, one or one per turn; otherwise the rollout fails (400)")
    ClientToken: str | None = Field(None, max_length=512)
    JobArn: str | None = None

    @field_validator("Rewards", mode="before")
    @classmethod
    def _scalar(cls, v: Any) -> Any:
        return [v] if isinstance(v, int | float) and not isinstance(v, bool) else v


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    """Every error: OpenAI's shape, so OpenAI clients raise with the message."""

    error: ErrorBody


# -- responses (documented in /openapi.json; built as plain dicts for speed) --------------------


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class MessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[dict[str, Any]]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChoiceOut(BaseModel):
    index: int
    message: MessageOut
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens reused from the stored conversation")


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletionResponse(BaseModel):
    """OpenAI chat completion. With `stream: true` the body is `text/event-stream` of
    `chat.completion.chunk` objects ending with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChoiceOut]
    usage: UsageOut
    system_fingerprint: str | None = Field(None, description="turnwise-v<policy version>")


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class RolloutAck(BaseModel):
    TrajectoryId: str
    Status: str


class UsageStats(BaseModel):
    prefill_tokens: int = Field(description="Prompt tokens computed by the sampler (reused prefix excluded)")
    sample_tokens: int = Field(description="Tokens sampled")
    reused_prompt_tokens: int = Field(description="Prompt tokens reused from the stored conversation")
    turns: int


class TurnOut(BaseModel):
    index: int
    prompt_tokens: int
    completion_tokens: int
    reused_prompt_tokens: int
    version: int
    finish_reason: str
    tool_parse_error: bool
    message: dict[str, Any]
    request_messages: int = Field(description="Number of messages the agent sent")
    prompt_ids: list[int] | None = None
    completion_ids: list[int] | None = None
    logprobs: list[float] | None = None


class TrajectoryOut(BaseModel):
    id: str
    job_id: str
    status: TrajectoryStatus
    error: str | None
    rewards: list[float]
    reward: float | None
    tools: list[dict[str, Any]]
    segments: int = Field(description="Training sequences the trajectory yields")
    usage: UsageStats
    turns: list[TurnOut]


class JobStatsOut(BaseModel):
    job_id: str
    trajectories: dict[str, int]
    usage: UsageStats
    prompt_plans: dict[str, int] = Field(description="Prompts per plan reason since the server started")
    tasks: dict[str, int] = Field(description="Pull-worker tasks by status")
    sampling_overrides: dict[str, int] = Field(
        default_factory=dict, description="Requests whose sampling differed from the job's, by param/outcome")


class HealthOut(BaseModel):
    status: Literal["healthy"] = "healthy"
    model: str
    version: int
