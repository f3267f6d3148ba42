"""`turnwise verify`: prove an environment fit for training before spending compute on it.

Four checks; every failure names the task, the tool and the diff.

1. reproducibility: each of `verify.tasks` tasks (sampled with the job's seed) is run once by
   the policy, alone, then again with the policy replaced by a replay of that run's completions
   (`RoutingSampler`: the agent code runs unchanged against the real runtime). Every tool
   response and the final state must be identical (tool-call ids aside).
2. isolation: `verify.concurrency` replays run at once (the tasks cycled), and each must match
   its solo run; no rollout may leave a file or directory in the temp directory (during
   rollouts, `tempfile` points at a private directory that verify inspects).
3. schema: the tools offered to the model (as recorded by the runtime, or `verify.tools`)
   against `verify.production_schemas`, tool by tool.
4. reward: the oracle agent reaches `success_threshold` on every task; the null agent scores
   0 or less.

The agent is the job's, of any `agent.kind`, run through the same dispatchers as training: an
in-process function (python), an agent server (http; it reaches verify's runtime through the
push payload's `metadata.endpoint`) or pull workers (worker; start them against verify's runtime,
`runtime.port` fixed). The contract an environment meets:
- Final state: the agent returns it next to its reward, `{"reward": r, "state": X}`, X any
  JSON-able value: `episode.state_snapshot()` (diffed by table row, data key and file) or
  `episode.state_hash()`. An agent that returns no `state` gets its tool responses compared,
  and the report says the final state was not.
- Tool responses are the `role: "tool"` messages the agent sends back to the model (any
  standard OpenAI tool loop, `run_tool_loop` included).
- `verify.oracle_agent` (optional) and `verify.null_agent` are `module:function` with the
  agent's signature, `async def (task, client, ctx)`; they may ignore the client (a model call
  gets an empty reply). The default null agent is the job's agent with a policy that replies
  nothing at once.
- `verify.production_schemas`: a JSON or YAML file holding a list of OpenAI tool entries
  (`{"type": "function", "function": {...}}` or the inner `{...}`), or `{"tools": [...]}`.
- `verify.tools` (optional): `module:attr`, a `ToolBox` or a list of tool entries, when the
  agent does not offer its tools in the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turnwise.config import AgentConfig, JobConfig
from turnwise.env.schema import schema_diff
from turnwise.eval.verify_replay import RoutingSampler, content_diff, json_diff, tool_responses
from turnwise.rollout.agent import AgentFn
from turnwise.rollout.dispatch import InProcessDispatcher, RolloutDispatcher, make_dispatcher
from turnwise.rollout.runtime import runtime_app
from turnwise.runtime.protocols import Chat, Sampler
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.types import Task, Trajectory, TrajectoryStatus, json_dumps_canonical


class CheckStatus(str, enum.Enum):
    """Outcome of one check."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    """Not run: nothing configured to check against, or nothing it could compare."""


@dataclass(frozen=True)
class Finding:
    """One failure: which task and tool, where, and how it differs."""

    task: str | None
    """Task id (None for a schema difference, which is not about one task)."""
    tool: str | None
    """Tool name, when the failure is about one tool."""
    where: str
    """"turn 2, call 0", "final state", "rollout", "temp dir", "schema"."""
    diff: tuple[str, ...]
    """`path: got != expected` lines, or an error message."""

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "tool": self.tool, "where": self.where, "diff": list(self.diff)}


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict."""

    name: str
    """reproducibility | isolation | schema | reward/oracle | reward/null."""
    status: CheckStatus
    """Pass, fail or skip."""
    summary: str
    """One line for the report."""
    findings: tuple[Finding, ...] = ()
    """Every failure."""
    notes: tuple[str, ...] = ()
    """Caveats on what the check covered."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "summary": self.summary,
                "findings": [f.to_dict() for f in self.findings], "notes": list(self.notes)}


@dataclass(frozen=True)
class VerifyReport:
    """All checks of one verify run."""

    checks: tuple[CheckResult, ...]
    """In the order of the module docstring."""
    tasks: tuple[str, ...]
    """Ids of the tasks verified."""
    concurrency: int
    """Concurrent rollouts in the isolation check."""

    @property
    def ok(self) -> bool:
        return all(c.status != CheckStatus.FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "tasks": list(self.tasks), "concurrency": self.concurrency,
                "checks": [c.to_dict() for c in self.checks]}

    def render(self, max_findings: int = 10) -> str:
        lines = [f"turnwise verify: {len(self.tasks)} tasks, {self.concurrency} concurrent rollouts"]
        for c in self.checks:
            lines.append(f"  {c.status.value.upper():4}  {c.name:16} {c.summary}")
            lines += [f"        note: {n}" for n in c.notes]
            for f in c.findings[:max_findings]:
                head = ", ".join(x for x in (f"task {f.task}" if f.task is not None else None,
                                             f"tool {f.tool}" if f.tool else None, f.where) if x)
                lines.append(f"        {head}:")
                lines += [f"          {d}" for d in f.diff]
            if len(c.findings) > max_findings:
                lines.append(f"        ... and {len(c.findings) - max_findings} more (--json lists all)")
        failed = [c.name for c in self.checks if c.status == CheckStatus.FAIL]
        lines.append(f"verify: FAILED ({', '.join(failed)})" if failed else "verify: OK")
        return "\n".join(lines)


_NO_STATE = object()


@dataclass(frozen=True)
class _Run:
    """One rollout as verify saw it."""

    task: Task
    trajectory: Trajectory | None
    reward: float | None
    state: Any = _NO_STATE
    error: str | None = None
    leftovers: tuple[str, ...] = field(default=())


async def verify_environment(
    agent: AgentFn | AgentConfig,
    tasks_T: Sequence[Task],
    *,
    policy: Sampler,
    chat: Chat,
    cfg: JobConfig | None = None,
    concurrency: int = 32,
    production_schemas: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    oracle_agent: AgentFn | None = None,
    null_agent: AgentFn | None = None,
) -> VerifyReport:
    """Run the four checks (module docstring) against a runtime on loopback serving `policy`.
    `agent`: an in-process function, or the job's `AgentConfig` (any kind); `cfg` (default
    `JobConfig()`) gives the sampling settings, timeouts, `success_threshold` and the runtime's port."""
    if not tasks_T:
        raise ValueError("verify needs at least one task")
    cfg = cfg or JobConfig()
    sampler = RoutingSampler(policy, chat.stop_token_ids)
    params = cfg.inference_params()
    with tempfile.TemporaryDirectory(prefix="turnwise-verify-store-") as store_dir, _private_tempdir() as tmp:
        store = TrajectoryStore(Path(store_dir) / "trajectories.db", job_id="verify")
        app = runtime_app(cfg, sampler=sampler, chat=chat, store=store, model_name="verify")
        server = RuntimeServer(app, host=cfg.runtime.host, port=cfg.runtime.port).start()
        try:
            def dispatcher(a: AgentFn | AgentConfig) -> RolloutDispatcher:
                if isinstance(a, AgentConfig):
                    return make_dispatcher(a, None, base_url=server.base_url, model="verify", store=store)
                return InProcessDispatcher(a, base_url=server.base_url, model="verify", store=store,
                                           concurrency=max(concurrency, 1), timeout=cfg.agent.rollout_timeout,
                                           require_model_call=False)

            dispatchers = {id(a): dispatcher(a) for a in (agent, oracle_agent, null_agent) if a is not None}

            def go(a: AgentFn | AgentConfig, task: Task, tid: str) -> Any:
                return _rollout(dispatchers[id(a)], task, tid, params)

            firsts, replays = [], []
            for i, task in enumerate(tasks_T):  # alone, one at a time: the reference runs
                firsts.append(_with_leftovers(await go(agent, task, f"first-{i}"), tmp))
            for i, (task, first) in enumerate(zip(tasks_T, firsts, strict=True)):
                if first.trajectory is not None:
                    sampler.replay(f"replay-{i}", first.trajectory)
                    replays.append(_with_leftovers(await go(agent, task, f"replay-{i}"), tmp))
                else:
                    replays.append(first)
            limit = asyncio.Semaphore(concurrency)

            async def concurrent(j: int) -> _Run:
                i = j % len(tasks_T)
                async with limit:
                    if firsts[i].trajectory is not None:
                        sampler.replay(f"iso-{j}", firsts[i].trajectory)  # type: ignore[arg-type]
                    return await go(agent, tasks_T[i], f"iso-{j}")

            together = await asyncio.gather(*(concurrent(j) for j in range(concurrency)))
            shared_leftovers = _leftovers(tmp)
            nulls, oracles = [], []
            for i, task in enumerate(tasks_T):
                sampler.empty(f"null-{i}")
                nulls.append(await go(null_agent or agent, task, f"null-{i}"))
                if oracle_agent is not None:
                    sampler.empty(f"oracle-{i}")
                    oracles.append(await go(oracle_agent, task, f"oracle-{i}"))
        finally:
            server.stop()
            store.close()

    repro = check_reproducibility(firsts, replays)
    bad = {f.task for f in repro.findings}
    recorded = [(r.task.id, r.trajectory.tools) for r in [*firsts, *nulls]
                if r.trajectory is not None and r.trajectory.tools]
    return VerifyReport(
        checks=(repro,
                check_isolation(firsts, together, bad, [*(x for r in firsts + replays for x in r.leftovers),
                                                        *shared_leftovers]),
                check_schemas(production_schemas, tools, recorded),
                check_oracle(oracles, cfg.success_threshold) if oracle_agent is not None else
                CheckResult("reward/oracle", CheckStatus.SKIP, "no verify.oracle_agent configured"),
                check_null(nulls, custom=null_agent is not None)),
        tasks=tuple(t.id for t in tasks_T), concurrency=concurrency)


def check_reproducibility(firsts: Sequence[_Run], replays: Sequence[_Run]) -> CheckResult:
    findings: list[Finding] = []
    n_tools = n_states = 0
    for first, again in zip(firsts, replays, strict=True):
        if first.error is not None:
            findings.append(Finding(first.task.id, None, "first run", (first.error,)))
            continue
        diffs, tools_compared, state_compared = _compare(first, again)
        if again.error is not None:
            diffs.append(Finding(first.task.id, None, "replay", (again.error,)))
        findings += diffs
        n_tools += tools_compared
        n_states += state_compared
    notes = []
    if n_tools == 0:
        notes.append("the policy called no tools, so no tool response was replayed "
                     "(use a policy that calls tools: model.path, or a warm-started checkpoint)")
    if n_states < len(firsts):
        notes.append(f"{len(firsts) - n_states} of {len(firsts)} rollouts returned no `state`: "
                     "their final state was not compared")
    bad_tasks = len({f.task for f in findings})
    summary = (f"{len(firsts)} tasks replayed: {n_tools} tool responses, {n_states} final states identical"
               if not findings else f"{bad_tasks} of {len(firsts)} tasks differ when replayed")
    return CheckResult("reproducibility", CheckStatus.FAIL if findings else CheckStatus.PASS, summary,
                       tuple(findings), tuple(notes))


def check_isolation(firsts: Sequence[_Run], together: Sequence[_Run], not_reproducible: set[str | None],
                    leftovers: Sequence[str]) -> CheckResult:
    findings = [Finding(None, None, "temp dir", (f"left behind by a rollout: {x}",)) for x in leftovers]
    compared = differ = 0
    n = len(together)
    for j, run in enumerate(together):
        first = firsts[j % len(firsts)]
        if first.error is not None or first.task.id in not_reproducible:
            continue
        compared += 1
        diffs, _, _ = _compare(first, run)
        if run.error is not None:
            diffs.append(Finding(run.task.id, None, "rollout", (run.error,)))
        differ += bool(diffs)
        findings += [Finding(f.task, f.tool, f"{f.where} (rollout {j + 1} of {n})", f.diff) for f in diffs]
    if compared == 0 and not leftovers:
        return CheckResult("isolation", CheckStatus.SKIP, "no reproducible task to compare concurrent rollouts with")
    skipped = n - compared
    notes = (f"{skipped} rollouts of tasks that are not reproducible were not compared",) if skipped else ()
    if findings:
        summary = f"{differ} of {compared} concurrent rollouts differ from their solo run"
        if leftovers:
            summary += f"; {len(leftovers)} temp entries left behind"
    else:
        summary = f"{compared} concurrent rollouts match their solo runs; no temp files left"
    return CheckResult("isolation", CheckStatus.FAIL if findings else CheckStatus.PASS, summary,
                       tuple(findings), notes)


def check_schemas(production: Sequence[Mapping[str, Any]] | None, tools: Sequence[Mapping[str, Any]] | None,
                  recorded: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> CheckResult:
    if production is None:
        return CheckResult("schema", CheckStatus.SKIP, "no verify.production_schemas configured")
    expected = _by_name(production)
    sets: list[tuple[str | None, Sequence[Mapping[str, Any]]]] = []
    for task_id, offered in [(None, tools)] if tools is not None else recorded:
        if all(json_dumps_canonical(list(offered)) != json_dumps_canonical(list(s)) for _, s in sets):
            sets.append((task_id, offered))  # type: ignore[arg-type]
    if not sets:
        return CheckResult("schema", CheckStatus.FAIL, "the agent offered the model no tools and verify.tools "
                           "is unset", (Finding(None, None, "schema", ("no tool schemas to compare",)),))
    findings: list[Finding] = []
    names = set(expected)
    for task_id, offered in sets:
        actual = _by_name(offered)
        names |= set(actual)
        where = "schema" if task_id is None or len(sets) == 1 else f"schema (tools offered for task {task_id})"
        for name in sorted(set(expected) - set(actual)):
            findings.append(Finding(None, name, where, ("in production, not offered by the environment",)))
        for name in sorted(set(actual) - set(expected)):
            findings.append(Finding(None, name, where, ("offered by the environment, not in production",)))
        for name in sorted(set(actual) & set(expected)):
            diff = schema_diff(actual[name], expected[name])
            if diff:
                findings.append(Finding(None, name, where, tuple(diff)))
    summary = (f"{len(expected)} tools match production" if not findings
               else f"{len({f.tool for f in findings})} of {len(names)} tools differ from production")
    return CheckResult("schema", CheckStatus.FAIL if findings else CheckStatus.PASS, summary, tuple(findings))


def check_oracle(oracles: Sequence[_Run], threshold: float) -> CheckResult:
    findings = [Finding(r.task.id, None, "reward", (r.error,) if r.error is not None else
                        (f"oracle scored {r.reward:g}, below success_threshold {threshold:g}",))
                for r in oracles if r.error is not None or (r.reward or 0.0) < threshold]
    summary = (f"oracle reaches {threshold:g} on all {len(oracles)} tasks" if not findings
               else f"oracle falls short on {len(findings)} of {len(oracles)} tasks")
    return CheckResult("reward/oracle", CheckStatus.FAIL if findings else CheckStatus.PASS, summary, tuple(findings))


def check_null(nulls: Sequence[_Run], custom: bool) -> CheckResult:
    findings = [Finding(r.task.id, None, "reward", (r.error,) if r.error is not None else
                        (f"null agent scored {r.reward:g}, expected 0",))
                for r in nulls if r.error is not None or (r.reward or 0.0) > 0.0]
    who = "null agent" if custom else "the agent with a policy that replies nothing"
    summary = (f"{who} scores 0 on all {len(nulls)} tasks" if not findings
               else f"{who} scores above 0 on {len(findings)} of {len(nulls)} tasks")
    return CheckResult("reward/null", CheckStatus.FAIL if findings else CheckStatus.PASS, summary, tuple(findings))


def load_tool_entries(value: Any, source: str) -> list[dict[str, Any]]:
    """A ToolBox, a list of OpenAI tool entries or `{"tools": [...]}` as `{"type": "function", ...}` dicts."""
    if hasattr(value, "schemas") and callable(value.schemas):
        value = value.schemas()
    if isinstance(value, Mapping) and "tools" in value:
        value = value["tools"]
    if not isinstance(value, list | tuple) or not all(isinstance(t, Mapping) for t in value):
        raise ValueError(f"{source}: expected a list of OpenAI tool schemas, got {type(value).__name__}")
    out = []
    for t in value:
        entry = dict(t) if "function" in t else {"type": "function", "function": dict(t)}
        if not isinstance(entry["function"], Mapping) or "name" not in entry["function"]:
            raise ValueError(f"{source}: a tool entry has no function name: {json_dumps_canonical(t)[:120]}")
        out.append(entry)
    return out


def _by_name(entries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["function"]["name"]: e for e in load_tool_entries(list(entries), "tools")}


def _compare(first: _Run, again: _Run) -> tuple[list[Finding], int, int]:
    """Findings where `again` differs from `first`; tool responses and states compared."""
    if first.trajectory is None or again.trajectory is None:
        return [], 0, 0
    a, b = tool_responses(first.trajectory), tool_responses(again.trajectory)
    findings = []
    for x, y in zip(a, b, strict=False):
        diff = content_diff(y.content, x.content)
        if not diff and x.tool != y.tool:
            diff = [f"tool {y.tool} answered where the first run called {x.tool}"]
        if diff:
            findings.append(Finding(first.task.id, x.tool, f"{x.where}, arguments {x.arguments or '?'}",
                                    tuple(diff)))
    if len(a) != len(b):
        findings.append(Finding(first.task.id, None, "tool calls",
                                (f"{len(b)} tool responses, the first run had {len(a)}",)))
    states = 0
    if first.state is not _NO_STATE and again.state is not _NO_STATE:
        states = 1
        diff = json_diff(again.state, first.state)
        if diff:
            findings.append(Finding(first.task.id, None, "final state", tuple(diff[:20])))
    return findings, min(len(a), len(b)), states


async def _rollout(dispatcher: RolloutDispatcher, task: Task, trajectory_id: str,
                   params: Mapping[str, Any]) -> _Run:
    """One agent run through its dispatcher, with a trajectory id verify chooses (replays key on it)."""
    r = await dispatcher.run_one(task, params, trajectory_id=trajectory_id)
    traj = r.trajectory
    failed = traj.status != TrajectoryStatus.REWARDED
    return _Run(task=task, trajectory=traj if traj.turns else None, reward=None if failed else traj.reward,
                state=_NO_STATE if r.state is None else r.state,
                error=(traj.error or "the rollout failed") if failed else None)


@contextlib.contextmanager
def _private_tempdir() -> Iterator[Path]:
    """Point `tempfile` at a fresh directory, so that whatever a rollout leaves there is visible
    (the system temp dir is shared with every other process). Restored on exit."""
    saved = tempfile.tempdir
    path = Path(tempfile.mkdtemp(prefix="turnwise-verify-tmp-"))
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(path, ignore_errors=True)


def _leftovers(tmp: Path) -> tuple[str, ...]:
    """Entries left in `tmp` after rollouts ended (then removed, so each is reported once)."""
    gc.collect()  # an unreferenced Episode cleans up in its finalizer
    found = sorted(tmp.iterdir())
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return tuple(p.name for p in found)


def _with_leftovers(run: _Run, tmp: Path) -> _Run:
    left = _leftovers(tmp)
    return run if not left else _Run(run.task, run.trajectory, run.reward, run.state, run.error,
                                     tuple(f"{x} (task {run.task.id})" for x in left))
