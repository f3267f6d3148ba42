"""Rollout routes: the agent's feedback (complete-rollout, update-reward), inspection, stats, health."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from turnwise.runtime.auth import job_matches
from turnwise.runtime.capture import build_segments
from turnwise.runtime.deps import ApiError, CallerDep, RuntimeDep, job_store
from turnwise.runtime.schemas import (
    CompleteRolloutRequest,
    ErrorResponse,
    HealthOut,
    JobStatsOut,
    RolloutAck,
    TrajectoryOut,
    UpdateRewardRequest,
)
from turnwise.runtime.store import ClientTokenConflict, TransitionError, UnknownTrajectory
from turnwise.runtime.tasks import TaskQueue
from turnwise.types import FailureKind

router = APIRouter(tags=["rollouts"])
INVALID_REWARD = "invalid reward"
"""Prefix of the error of a rollout whose update-reward could not be used (its typed reason)."""


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse} for c in codes}


def _check_body_job(caller: CallerDep, job_arn: str | None) -> None:
    if caller.bound and job_arn and not job_matches(job_arn, caller.job_id):
        raise ApiError(403, f"this API key is not valid for job {job_arn!r}")


@router.post("/complete-rollout", response_model=RolloutAck, responses=_errors(400, 401, 403, 404, 409, 413))
async def complete_rollout(body: CompleteRolloutRequest, rt: RuntimeDep, caller: CallerDep) -> dict[str, Any]:
    """Seal a trajectory as ready (to be rewarded and trained on) or failed. Idempotent with ClientToken."""
    _check_body_job(caller, body.JobArn)
    store = job_store(rt, caller)
    try:
        store.complete(body.TrajectoryId, body.status(), error=body.Error, client_token=body.ClientToken)
    except (UnknownTrajectory, TransitionError, ClientTokenConflict) as e:
        raise ApiError(404 if isinstance(e, UnknownTrajectory) else 409, str(e)) from None
    return {"TrajectoryId": body.TrajectoryId, "Status": body.Status}


@router.post("/update-reward", response_model=RolloutAck, responses=_errors(400, 401, 403, 404, 409, 413))
async def update_reward(body: UpdateRewardRequest, rt: RuntimeDep, caller: CallerDep) -> dict[str, Any]:
    """Reward a completed trajectory: one value, or one per turn. Idempotent with ClientToken."""
    _check_body_job(caller, body.JobArn)
    store = job_store(rt, caller)
    try:
        store.set_rewards(body.TrajectoryId, body.Rewards, client_token=body.ClientToken)
    except (UnknownTrajectory, TransitionError, ClientTokenConflict) as e:
        raise ApiError(404 if isinstance(e, UnknownTrajectory) else 409, str(e)) from None
    except ValueError as e:  # wrong length or not finite: that rollout fails, with the reason
        reason = f"{INVALID_REWARD}: {e}"
        failed = store.fail(body.TrajectoryId, FailureKind.BAD_REWARD, reason)
        raise ApiError(400, reason + ("; the trajectory is now failed" if failed else "")) from None
    trajectory = store.get(body.TrajectoryId, last_turn_only=True)
    return {"TrajectoryId": body.TrajectoryId, "Status": trajectory.status.value if trajectory else "unknown"}


@router.get("/trajectories/{trajectory_id}", response_model=TrajectoryOut, responses=_errors(401, 404))
async def get_trajectory(trajectory_id: str, rt: RuntimeDep, caller: CallerDep,
                         tokens: Annotated[bool, Query(description="Include token ids and logprobs")] = False,
                         ) -> dict[str, Any]:
    """A trajectory as recorded: status, rewards, usage, and each turn's token counts."""
    store = job_store(rt, caller)
    trajectory = store.get(trajectory_id)
    if trajectory is None:
        raise ApiError(404, f"unknown trajectory {trajectory_id!r} in job {caller.job_id!r}")
    usage = store.usage(trajectory_id)
    turns = []
    for t in trajectory.turns:
        turn: dict[str, Any] = {
            "index": t.index, "prompt_tokens": len(t.prompt_ids), "completion_tokens": len(t.completion_ids),
            "reused_prompt_tokens": t.reused_prompt_tokens, "version": t.version,
            "finish_reason": t.finish_reason.value, "tool_parse_error": t.tool_parse_error,
            "message": t.message.to_openai(), "request_messages": len(t.request_messages)}
        if tokens:
            turn.update(prompt_ids=list(t.prompt_ids), completion_ids=list(t.completion_ids),
                        logprobs=list(t.logprobs))
        turns.append(turn)
    return {"id": trajectory.id, "job_id": trajectory.job_id, "status": trajectory.status.value,
            "error": trajectory.error, "rewards": list(trajectory.rewards),
            "reward": trajectory.reward if trajectory.rewards else None, "tools": list(trajectory.tools),
            "segments": len(build_segments(trajectory)), "usage": _usage(usage), "turns": turns}


def _usage(u: Any) -> dict[str, int]:
    return {"prefill_tokens": u.prefill_tokens, "sample_tokens": u.sample_tokens,
            "reused_prompt_tokens": u.reused_prompt_tokens, "turns": u.turns}


@router.get("/jobs/{job_id}/stats", response_model=JobStatsOut, responses=_errors(401, 403))
async def job_stats(job_id: str, rt: RuntimeDep, caller: CallerDep) -> dict[str, Any]:
    """Trajectory counts by status and token usage (prefill, sample) of a job."""
    if job_id != caller.job_id and (caller.bound or rt.auth.enabled):
        raise ApiError(403, f"this API key is not valid for job {job_id!r}")
    store = rt.store.for_job(job_id)
    stats = store.stats()
    return {"job_id": stats.job_id, "trajectories": dict(stats.trajectories_by_status),
            "usage": _usage(stats.usage), "prompt_plans": dict(rt.prompt_plans),
            "tasks": TaskQueue(store).counts(), "sampling_overrides": dict(rt.override_counts)}


@router.get("/health", response_model=HealthOut)
async def health(rt: RuntimeDep) -> dict[str, Any]:
    """Liveness: the server is up (no key needed)."""
    return {"status": "healthy", "model": rt.model_name, "version": rt.sampler.version if rt.sampler else 0}
