"""The data plane: each job's runtime server (OpenAI-compatible sampling, rollout feedback, the
pull-worker task queue), reached through the service with the job's key.

    POST /jobs/{id}/runtime/v1/chat/completions      (the job's `agent.endpoint`)
    POST /v1/chat/completions                         (the job named by its key; the managed
                                                       service's agent SDK unchanged)

A job key reaches only its job: another job's path is 403, and at the root a
`X-Amzn-SageMaker-Job-Arn` naming another job is 403. The service swaps the caller's key for the
job runtime's own (which only the service knows) and streams the answer back unchanged, chunked
chat completions included. Adding tasks to the queue (`POST /tasks`) is the trainer's, not an agent's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import httpx
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from turnwise.runtime.auth import job_matches
from turnwise.runtime.deps import JOB_ARN_HEADER, ApiError
from turnwise.service.lifecycle import JobStatus

if TYPE_CHECKING:
    from turnwise.service.app import Service

router = APIRouter()

HOP_HEADERS = frozenset({"host", "authorization", "content-length", "connection", "keep-alive", "transfer-encoding",
                         "te", "upgrade", "proxy-authorization", JOB_ARN_HEADER.lower(), "jobarn"})
ALLOWED = ("v1/", "complete-rollout", "update-reward", "trajectories/", "tasks/", "health")
"""Runtime paths an agent may call (`tasks/` covers lease, heartbeat, report; not POST /tasks)."""


def _client(request: Request) -> httpx.AsyncClient:
    state = request.app.state
    if getattr(state, "proxy_client", None) is None:
        state.proxy_client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))
    return state.proxy_client


async def _forward(request: Request, job_id: str, path: str) -> Response:
    s: Service = request.app.state.service
    job = s.store.job(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r}")
    if not path.startswith(ALLOWED):
        raise ApiError(403, f"/{path} is not part of a job's runtime endpoint")
    if JobStatus(job.status) not in (JobStatus.IN_PROGRESS, JobStatus.STOPPING) or job.runtime_port is None:
        raise ApiError(409, f"job {job_id} is {job.status}: its runtime endpoint is not serving")
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
    headers["authorization"] = f"Bearer {job.runtime_key}"
    url = httpx.URL(f"http://127.0.0.1:{job.runtime_port}/{path}", query=request.url.query.encode())
    client = _client(request)
    upstream = client.build_request(request.method, url, headers=headers, content=await request.body())
    try:
        answer = await client.send(upstream, stream=True)
    except httpx.TransportError as e:
        raise ApiError(503, f"job {job_id}'s runtime is not reachable yet ({type(e).__name__}); retry") from None
    out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS | {"content-encoding"}}
    return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, headers=out_headers,
                             background=BackgroundTask(answer.aclose))


def _job_key(request: Request, authorization: str | None, job_id: str | None) -> str:
    """The job the caller's job key is for (it must be `job_id` when given)."""
    s: Service = request.app.state.service
    who = s.principal(authorization)
    if who.role != "job" or who.job_id is None:
        raise ApiError(403, "a job's runtime endpoint takes that job's key (returned when the job was created)")
    if job_id is not None and who.job_id != job_id:
        raise ApiError(403, f"this key is not valid for job {job_id!r}")
    return who.job_id


METHODS = ["GET", "POST", "PUT", "DELETE"]


@router.api_route("/jobs/{job_id}/runtime/{path:path}", methods=METHODS, include_in_schema=False)
async def job_runtime(job_id: str, path: str, request: Request,
                      authorization: Annotated[str | None, Header()] = None) -> Response:
    return await _forward(request, _job_key(request, authorization, job_id), path)


async def _by_key(request: Request, path: str, authorization: str | None, job_arn: str | None) -> Response:
    job_id = _job_key(request, authorization, None)
    if job_arn and not job_matches(job_arn, job_id):
        raise ApiError(403, f"this key is not valid for job {job_arn!r}")
    return await _forward(request, job_id, path)


@router.api_route("/v1/{path:path}", methods=METHODS, include_in_schema=False)
async def root_v1(path: str, request: Request, authorization: Annotated[str | None, Header()] = None,
                  job_arn: Annotated[str | None, Header(alias=JOB_ARN_HEADER)] = None) -> Response:
    return await _by_key(request, f"v1/{path}", authorization, job_arn)


@router.post("/complete-rollout", include_in_schema=False)
async def root_complete(request: Request, authorization: Annotated[str | None, Header()] = None,
                        job_arn: Annotated[str | None, Header(alias=JOB_ARN_HEADER)] = None) -> Response:
    return await _by_key(request, "complete-rollout", authorization, job_arn)


@router.post("/update-reward", include_in_schema=False)
async def root_reward(request: Request, authorization: Annotated[str | None, Header()] = None,
                      job_arn: Annotated[str | None, Header(alias=JOB_ARN_HEADER)] = None) -> Response:
    return await _by_key(request, "update-reward", authorization, job_arn)
