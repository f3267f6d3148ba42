"""What the routers share: the runtime's dependencies (held by the app, not by modules) and errors."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request

from turnwise.runtime.auth import Auth, AuthError, Caller
from turnwise.runtime.protocols import Chat, Sampler
from turnwise.runtime.store import TrajectoryStore
from turnwise.types import SamplingParams

TRAJECTORY_HEADERS = ("X-Amzn-SageMaker-Trajectory-Id", "X-Turnwise-Trajectory-Id")
JOB_ARN_HEADER = "X-Amzn-SageMaker-Job-Arn"


class ApiError(Exception):
    """An error the client should see: HTTP status, OpenAI-style type, clear message."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
             413: "request_too_large", 500: "internal_error", 503: "unavailable_error"}

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "code": self.status}}


@dataclass
class Runtime:
    """Everything the routes need; created by `create_app` and kept on `app.state.runtime`."""

    sampler: Sampler | None
    """None when the chat routes forward to an external endpoint (the eval proxy)."""
    chat: Chat | None
    store: TrajectoryStore
    model_name: str
    default_params: SamplingParams
    auth: Auth
    prompt_plans: Counter[str] = field(default_factory=Counter)
    """How many prompts were planned for each `PlanReason` (re-renders are drift risks)."""
    task_max_attempts: int = 3
    """Leases of a pull-worker task before it fails (see `turnwise.runtime.tasks`)."""
    sampler_takes_cache_key: bool = False
    """The sampler's `generate` accepts `cache_key=` (prefix KV reuse per trajectory)."""
    sampler_takes_on_token: bool = False
    """The sampler's `generate` accepts `on_token=` (each token as it is sampled: real streaming)."""
    sampler_takes_context: bool = False
    """The sampler's `generate` accepts `context=` (a `SampleContext`: trajectory, task, turn)."""
    sampler_supports_grammar: bool = False
    """The sampler honours `SamplingParams.grammar` (forced tool use, structured output); 400 otherwise."""
    sampler_supports_top_logprobs: bool = False
    """The sampler honours `SamplingParams.top_logprobs`; 400 otherwise."""
    seed: int | None = 0
    """Job seed: a request without `seed` samples with one derived from it, the trajectory id and
    the turn (`turnwise.runtime.service.derive_seed`); None: OS entropy."""
    sampling_overrides: str = "warn"
    """allow | warn | deny: a registered rollout's request whose sampling differs from the job's."""
    override_counts: Counter[str] = field(default_factory=Counter)
    """Requests whose sampling differed from the job's, by `<param>/<allowed|replaced|denied>`."""
    override_warned: set[tuple[str, object]] = field(default_factory=set)
    """(param, value) pairs already logged under `warn`."""


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_caller(
    request: Request,
    authorization: Annotated[str | None, Header(description="Bearer <API key>; required when keys are set")] = None,
    job_arn: Annotated[str | None, Header(alias=JOB_ARN_HEADER, description="The job (checked against the key)")] = None,
) -> Caller:
    rt: Runtime = request.app.state.runtime
    try:
        return rt.auth.check(authorization, request.client.host if request.client else None, job_arn or None)
    except AuthError as e:
        raise ApiError(e.status, str(e)) from None


async def trajectory_id_header(
    amzn: Annotated[str | None, Header(alias=TRAJECTORY_HEADERS[0],
                                       description="The trajectory this call belongs to")] = None,
    turnwise: Annotated[str | None, Header(alias=TRAJECTORY_HEADERS[1],
                                           description="Alias of X-Amzn-SageMaker-Trajectory-Id")] = None,
) -> str:
    value = (amzn or turnwise or "").strip()
    if not value:
        raise ApiError(400, f"missing header {TRAJECTORY_HEADERS[0]} (or {TRAJECTORY_HEADERS[1]}): "
                            "every chat call must name its trajectory")
    if len(value) > 512:
        raise ApiError(400, "trajectory id longer than 512 characters")
    return value


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
CallerDep = Annotated[Caller, Depends(get_caller)]
TrajectoryIdDep = Annotated[str, Depends(trajectory_id_header)]


def job_store(rt: Runtime, caller: Caller) -> TrajectoryStore:
    return rt.store.for_job(caller.job_id)
