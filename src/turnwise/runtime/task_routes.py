"""Task routes for pull workers (see `turnwise.runtime.tasks` for the lifecycle and guarantees).

    POST /tasks                      trainer: queue push payloads       {"Tasks": [{"TaskId"?, "Payload"}]}
    POST /tasks/lease                worker: take up to MaxTasks        {"WorkerId", "MaxTasks"?, "LeaseSeconds"?}
    POST /tasks/{id}/heartbeat       worker: keep the lease             {"LeaseId", "LeaseSeconds"?}
    POST /tasks/{id}/report          worker: done | failed              {"LeaseId", "Status", "Error"?, "Failure"?}
    GET  /tasks/{id}                 anyone with the job's key: status, attempt, trajectory id
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from turnwise.runtime.auth import Caller
from turnwise.runtime.deps import ApiError, CallerDep, Runtime, RuntimeDep, job_store
from turnwise.runtime.schemas import ErrorResponse
from turnwise.runtime.tasks import LeaseLost, TaskQueue, TaskState, UnknownTask
from turnwise.types import FailureKind

router = APIRouter(tags=["tasks"])


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PayloadIn(BaseModel):
    """A push payload (DESIGN.md): checked here, so a bad one is refused on POST, not at lease time."""

    model_config = ConfigDict(extra="allow")

    instance: dict[str, Any] | None = Field(None, description="The task row (the SDK's payload)")
    prompt: str | list[Any] | dict[str, Any] | None = Field(None, description="The task's prompt (AgentCore's payload)")
    metadata: dict[str, Any] = Field(default_factory=dict, description="job_arn, trajectory_id, endpoint, ...")
    inference_params: dict[str, Any] | None = None
    inferenceParams: dict[str, Any] | None = None
    model_name: str | None = None


class TaskIn(_Body):
    TaskId: str | None = Field(None, min_length=1, max_length=400)
    Payload: PayloadIn = Field(description="Push payload: instance, prompt, metadata, inference_params, ...")


class AddTasksRequest(_Body):
    Tasks: list[TaskIn] = Field(min_length=1, max_length=100_000)


class AddTasksResponse(BaseModel):
    TaskIds: list[str]


class LeaseRequest(_Body):
    WorkerId: str = Field(min_length=1, max_length=200)
    MaxTasks: int = Field(1, ge=1, le=1024)
    LeaseSeconds: float = Field(60.0, gt=0, le=86_400)


class LeaseOut(BaseModel):
    TaskId: str
    LeaseId: str
    TrajectoryId: str
    Attempt: int
    ExpiresAt: float
    Payload: dict[str, Any]


class LeaseResponse(BaseModel):
    Leases: list[LeaseOut]


class HeartbeatRequest(_Body):
    LeaseId: str
    LeaseSeconds: float = Field(60.0, gt=0, le=86_400)


class HeartbeatResponse(BaseModel):
    ExpiresAt: float


class ReportRequest(_Body):
    LeaseId: str
    Status: Literal["done", "failed"]
    Error: str | None = Field(None, max_length=4096)
    Failure: FailureKind | None = None
    """Why a failed task failed (default agent_error)."""


class TaskOut(BaseModel):
    TaskId: str
    Status: str
    Attempt: int
    TrajectoryId: str | None
    WorkerId: str | None
    Error: str | None


def _queue(rt: Runtime, caller: Caller) -> TaskQueue:
    return TaskQueue(job_store(rt, caller), max_attempts=rt.task_max_attempts)


def _task(state: TaskState) -> dict[str, Any]:
    return {"TaskId": state.task_id, "Status": state.status.value, "Attempt": state.attempt,
            "TrajectoryId": state.trajectory_id, "WorkerId": state.worker_id, "Error": state.error}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse} for c in codes}


@router.post("/tasks", response_model=AddTasksResponse, responses=_errors(400, 401, 413))
async def add_tasks(body: AddTasksRequest, rt: RuntimeDep, caller: CallerDep) -> dict[str, Any]:
    """Queue rollouts for pull workers (an id already queued is kept as it is)."""
    ids = _queue(rt, caller).add([(t.TaskId, t.Payload.model_dump(exclude_none=True)) for t in body.Tasks])
    return {"TaskIds": ids}


@router.post("/tasks/lease", response_model=LeaseResponse, responses=_errors(400, 401))
async def lease_tasks(body: LeaseRequest, request: Request, rt: RuntimeDep, caller: CallerDep) -> dict[str, Any]:
    """Lease up to MaxTasks queued tasks. Each lease is a new attempt with its own trajectory id."""
    endpoint = str(request.base_url).rstrip("/")
    leases = []
    for lease in _queue(rt, caller).lease(body.WorkerId, body.MaxTasks, body.LeaseSeconds):
        payload = dict(lease.payload)
        meta = payload.get("metadata")
        payload["metadata"] = {"endpoint": endpoint, **(meta if isinstance(meta, dict) else {})}
        leases.append({"TaskId": lease.task_id, "LeaseId": lease.lease_id, "TrajectoryId": lease.trajectory_id,
                       "Attempt": lease.attempt, "ExpiresAt": lease.expires_at, "Payload": payload})
    return {"Leases": leases}


@router.post("/tasks/{task_id}/heartbeat", response_model=HeartbeatResponse, responses=_errors(400, 401, 404, 409))
async def heartbeat(task_id: str, body: HeartbeatRequest, rt: RuntimeDep, caller: CallerDep) -> dict[str, Any]:
    """Extend a lease. 409 once it expired (the task went back to the queue: stop working on it)."""
    try:
        return {"ExpiresAt": _queue(rt, caller).heartbeat(task_id, body.LeaseId, body.LeaseSeconds)}
    except (UnknownTask, LeaseLost) as e:
        raise ApiError(404 if isinstance(e, UnknownTask) else 409, str(e)) from None


@router.post("/tasks/{task_id}/report", response_model=TaskOut, responses=_errors(400, 401, 404, 409))
async def report(task_id: str, body: ReportRequest, rt: RuntimeDep, caller: CallerDep) -> dict[str, Any]:
    """End a leased task. Repeating the same report is a no-op; a stale lease gets 409."""
    try:
        return _task(_queue(rt, caller).report(task_id, body.LeaseId, body.Status, body.Error,
                                                        failure=body.Failure))
    except (UnknownTask, LeaseLost) as e:
        raise ApiError(404 if isinstance(e, UnknownTask) else 409, str(e)) from None


@router.get("/tasks/{task_id}", response_model=TaskOut, responses=_errors(401, 404))
async def get_task(task_id: str, rt: RuntimeDep, caller: CallerDep) -> dict[str, Any]:
    """A task's status, attempt and current trajectory id."""
    try:
        return _task(_queue(rt, caller).get(task_id))
    except UnknownTask as e:
        raise ApiError(404, str(e)) from None
