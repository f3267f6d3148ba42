"""Evaluation jobs: run an agent on the held-out tasks, grade, summarize, report, gate.

    result = evaluate(cfg, "base", out_dir)                        # or a checkpoint dir, or a URL
    cmp = compare(cfg, "base", "runs/x/checkpoints/final", out_dir)
    print(render_table(cmp)); cmp.passed                           # the deployment gate

An evaluation directory holds `meta.json` (what was evaluated, how), `tasks.jsonl` (one line
per task, written as soon as its trials finish, with every trajectory), `summary.json`,
`report.md`, `pass_at_k.png` and `trajectories.db` (token ids for a local model; for an endpoint,
the turns without ids). Resuming reads `tasks.jsonl` and runs only the tasks it lacks; a line cut short by a crash is dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from turnwise.config import ConfigError, JobConfig
from turnwise.eval.backends import EmbeddedBackend, EndpointBackend
from turnwise.eval.records import EvalRollout, grade_rollout
from turnwise.eval.report import markdown_report, plot_pass_curves, render_comparison, render_table
from turnwise.eval.stats import (
    Delta,
    EvalTable,
    GateCheck,
    check_gate,
    compare_tables,
    k_values,
    metric_names,
    summarize,
)
from turnwise.eval.tracking import log_comparison, log_evaluation
from turnwise.rollout.agent import AgentFn
from turnwise.rollout.usage import run_usage
from turnwise.types import Task

LABELS = {"base": "base", "checkpoint": "fine-tuned", "endpoint": "endpoint"}


@dataclass(frozen=True)
class ModelSpec:
    """What to evaluate: `base` (the config's model), a checkpoint dir, or an endpoint URL."""

    kind: Literal["base", "checkpoint", "endpoint"]
    target: str | None = None
    """The checkpoint path or the endpoint URL."""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        if text == "base":
            return cls("base")
        if text.startswith(("http://", "https://")):
            return cls("endpoint", text)
        return cls("checkpoint", text)

    def __str__(self) -> str:
        return self.target or self.kind


@dataclass(frozen=True)
class EvalResult:
    """One evaluated model."""

    model: ModelSpec
    label: str
    out_dir: Path
    metrics: dict[str, float]
    n_tasks: int
    group_size: int
    grader: str
    gate: tuple[GateCheck, ...]
    summary_path: Path
    report_path: Path
    tasks_path: Path
    mlflow_run_id: str | None
    table: EvalTable

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.gate)


@dataclass(frozen=True)
class ComparisonResult:
    """A and B on the same tasks: per-metric values, B - A, bootstrap intervals, the gate on B."""

    a: EvalResult
    b: EvalResult
    deltas: dict[str, Delta]
    confidence: float
    gate: tuple[GateCheck, ...]
    out_dir: Path
    summary_path: Path
    report_path: Path

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.gate)


def evaluate(cfg: JobConfig, model: str | ModelSpec, out_dir: str | Path, *, agent: AgentFn | None = None,
             resume: bool = False, label: str | None = None, endpoint_model: str | None = None,
             apply_gate: bool = True, mlflow_tags: Mapping[str, str] | None = None) -> EvalResult:
    """Evaluate one model on `data.test_path`; writes the evaluation directory and an MLflow run
    named `eval: <label>` (`mlflow_tags`: extra run tags, e.g. the training run's id)."""
    from turnwise.track import silence_third_party_bars

    silence_third_party_bars()
    spec = model if isinstance(model, ModelSpec) else ModelSpec.parse(model)
    out_dir = Path(out_dir)
    agent = agent or _load_agent(cfg)
    tasks = load_test_tasks(cfg)
    G = cfg.eval.group_size
    ks = k_values(cfg.pass_k_values, G)
    gate = cfg.eval.gate if apply_gate else {}
    check_gate_names(gate, ks, comparing=False)
    if spec.kind == "checkpoint" and not Path(spec.target or "").is_dir():
        raise ConfigError(f"checkpoint {spec.target!r} is not a directory (a Hugging Face model dir)")
    params = inference_params(cfg)
    meta = {"model": str(spec), "kind": spec.kind, "group_size": G, "inference_params": params,
            "grader": cfg.eval.grader, "answer_key": cfg.eval.answer_key, "test_path": cfg.data.test_path,
            "success_threshold": cfg.success_threshold}
    tasks_path = out_dir / "tasks.jsonl"
    done = _start(out_dir, meta, resume)
    todo = [t for t in tasks if t.id not in done]
    if todo:
        with _backend(cfg, spec, out_dir, agent, endpoint_model) as backend:
            backend.run(_run_tasks(cfg, backend, todo, params, tasks_path, done))
    per_task = [done[t.id] for t in tasks]
    table = EvalTable.from_rollouts(per_task)
    metrics = summarize(table, ks)
    checks = tuple(_gate(gate, metrics))
    label = label or LABELS[spec.kind]
    result = EvalResult(model=spec, label=label, out_dir=out_dir, metrics=metrics, n_tasks=len(tasks),
                        group_size=G, grader=cfg.eval.grader, gate=checks, summary_path=out_dir / "summary.json",
                        report_path=out_dir / "report.md", tasks_path=tasks_path, mlflow_run_id=None, table=table)
    plot_pass_curves(out_dir / "pass_at_k.png", {label: metrics}, f"{label}: pass@k and pass^k, {len(tasks)} tasks")
    failures = [(r.task_id, r.error) for rs in per_task for r in rs if r.error][:10]
    result.report_path.write_text(markdown_report(
        f"Evaluation: {label}", render_table(result), "pass_at_k.png", _details(cfg, spec, meta), failures))
    run_id = log_evaluation(cfg, label, str(spec), metrics, meta,
                            [result.report_path, out_dir / "pass_at_k.png", tasks_path], mlflow_tags)
    result = EvalResult(**{**vars(result), "mlflow_run_id": run_id})
    _write_summary(result)
    return result


def compare(cfg: JobConfig, a: str | ModelSpec, b: str | ModelSpec, out_dir: str | Path, *,
            agent: AgentFn | None = None, resume: bool = False, endpoint_model: str | None = None,
            labels: tuple[str, str] | None = None, mlflow_tags: Mapping[str, str] | None = None) -> ComparisonResult:
    """Evaluate A and B (into `out_dir/a`, `out_dir/b`) and compare them; the gate applies to B.
    `labels` names the two columns (default: by kind, e.g. base / fine-tuned) and the MLflow runs
    (`eval: A`, `eval: B`, `compare: A vs B`, each tagged with `mlflow_tags`)."""
    out_dir = Path(out_dir)
    spec_a = a if isinstance(a, ModelSpec) else ModelSpec.parse(a)
    spec_b = b if isinstance(b, ModelSpec) else ModelSpec.parse(b)
    ks = k_values(cfg.pass_k_values, cfg.eval.group_size)
    check_gate_names(cfg.eval.gate, ks, comparing=True)
    label_a, label_b = labels or (LABELS[spec_a.kind], LABELS[spec_b.kind])
    if label_a == label_b:
        label_a, label_b = f"A ({label_a})", f"B ({label_b})"
    agent = agent or _load_agent(cfg)
    ra = evaluate(cfg, spec_a, out_dir / "a", agent=agent, resume=resume, label=label_a,
                  endpoint_model=endpoint_model, apply_gate=False, mlflow_tags=mlflow_tags)
    rb = evaluate(cfg, spec_b, out_dir / "b", agent=agent, resume=resume, label=label_b,
                  endpoint_model=endpoint_model, apply_gate=False, mlflow_tags=mlflow_tags)
    deltas = compare_tables(ra.table, rb.table, ks, samples=cfg.eval.bootstrap_samples,
                            confidence=cfg.eval.confidence, seed=cfg.seed)
    checks = tuple(_gate(cfg.eval.gate, rb.metrics, deltas))
    result = ComparisonResult(a=ra, b=rb, deltas=deltas, confidence=cfg.eval.confidence, gate=checks,
                              out_dir=out_dir, summary_path=out_dir / "comparison.json",
                              report_path=out_dir / "report.md")
    plot_pass_curves(out_dir / "pass_at_k.png", {label_a: ra.metrics, label_b: rb.metrics},
                     f"{label_a} vs {label_b}: pass@k and pass^k, {ra.n_tasks} tasks")
    table = render_comparison(label_a, label_b, deltas, cfg.eval.confidence, gate=checks)
    failures = [(f"{label_b}: {r.task_id}", r.error) for rs in _read_done(rb.tasks_path)[0].values()
                for r in rs if r.error][:10]
    result.report_path.write_text(markdown_report(
        f"Evaluation: {label_a} vs {label_b}", table, "pass_at_k.png",
        {"A": f"{label_a} = {spec_a}", "B": f"{label_b} = {spec_b}",
         "tasks x trials": f"{ra.n_tasks} x {ra.group_size}", "grader": cfg.eval.grader,
         "bootstrap": f"{cfg.eval.bootstrap_samples} paired resamples of tasks"}, failures))
    result.summary_path.write_text(json.dumps({
        "a": {"model": str(spec_a), "label": label_a, "metrics": ra.metrics, "summary": str(ra.summary_path)},
        "b": {"model": str(spec_b), "label": label_b, "metrics": rb.metrics, "summary": str(rb.summary_path)},
        "deltas": {m: asdict(d) for m, d in deltas.items()}, "confidence": cfg.eval.confidence,
        "gate": [asdict(c) for c in checks], "passed": result.passed,
        "report": str(result.report_path)}, indent=2))
    log_comparison(cfg, label_a, label_b, deltas, cfg.eval.confidence, (ra.mlflow_run_id, rb.mlflow_run_id),
                   [result.report_path, out_dir / "pass_at_k.png"], mlflow_tags)
    return result


# -- pieces ---------------------------------------------------------------------------------------

def load_test_tasks(cfg: JobConfig) -> list[Task]:
    from turnwise.rollout.tasks import TaskFileError, load_tasks

    if not cfg.data.test_path:
        raise ConfigError("data.test_path is required for evaluation")
    try:
        tasks = load_tasks(cfg.data.test_path)[: cfg.eval.max_tasks]
    except TaskFileError as e:
        raise ConfigError(str(e)) from None
    if cfg.eval.grader != "reward":
        missing = [t.id for t in tasks if cfg.eval.answer_key not in t.row]
        if missing:
            raise ConfigError(f"grader {cfg.eval.grader} needs task field {cfg.eval.answer_key!r} "
                              f"(eval.answer_key); tasks without it: {missing[:5]}")
    return tasks


def inference_params(cfg: JobConfig) -> dict[str, float | int]:
    e = cfg.eval
    return {"temperature": cfg.temperature if e.temperature is None else e.temperature,
            "top_p": cfg.sampling_top_p if e.top_p is None else e.top_p,
            "max_tokens": cfg.sampling_max_tokens if e.max_tokens is None else e.max_tokens}


def check_gate_names(gate: Mapping[str, Any], ks: Sequence[int], comparing: bool) -> None:
    """Fail before running anything when the gate names a metric that will not exist."""
    known = set(metric_names(ks))
    for name in gate:
        bare = name[len("delta/"):] if comparing and name.startswith("delta/") else name
        if bare not in known:
            raise ConfigError(f"eval.gate: unknown metric {name!r}"
                              + ("" if comparing else " ('delta/' gates need --compare)")
                              + f"; metrics: {', '.join(sorted(known))}")


def _gate(gate: Mapping[str, float | str], metrics: Mapping[str, float],
          deltas: Mapping[str, Delta] | None = None) -> list[GateCheck]:
    try:
        return check_gate(gate, metrics, deltas)
    except KeyError as e:
        raise ConfigError(f"eval.gate: metric {e.args[0]!r} was not computed in this evaluation") from None
    except ValueError as e:
        raise ConfigError(f"eval.gate: {e}") from None


def _load_agent(cfg: JobConfig) -> AgentFn | None:
    """The in-process agent; None for `agent.kind` http or worker (the runtime's dispatcher reaches those)."""
    from turnwise.rollout.agent import AgentLoadError, load_agent

    if cfg.agent.kind != "python":
        return None
    try:
        return load_agent(cfg.agent.function)
    except AgentLoadError as e:
        raise ConfigError(str(e)) from None


def _backend(cfg: JobConfig, spec: ModelSpec, out_dir: Path, agent: AgentFn | None,
             endpoint_model: str | None) -> EmbeddedBackend | EndpointBackend:
    if spec.kind == "endpoint":
        return EndpointBackend(cfg, spec.target or "", out_dir, agent, model=endpoint_model)
    from turnwise.policy.load import ModelLoadError

    try:
        return EmbeddedBackend(cfg, out_dir, agent, model_path=spec.target)
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None


def _start(out_dir: Path, meta: Mapping[str, Any], resume: bool) -> dict[str, list[EvalRollout]]:
    """Create or reopen the evaluation dir; returns the tasks already done (id -> rollouts)."""
    meta_path, tasks_path = out_dir / "meta.json", out_dir / "tasks.jsonl"
    if tasks_path.exists() and not resume:
        raise ConfigError(f"{out_dir} already holds an evaluation; pass --resume to finish it, or another dir")
    if resume and meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = sorted(k for k in meta if old.get(k) != json.loads(json.dumps(meta[k])))
        if diff:
            raise ConfigError(f"cannot resume {out_dir}: it was run with other settings ({', '.join(diff)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2))
    done, lines = _read_done(tasks_path)
    # rewrite without a line cut short by an interruption, so that appends start on a fresh line
    tasks_path.write_text("".join(line + "\n" for line in lines))
    return done


def _read_done(path: Path) -> tuple[dict[str, list[EvalRollout]], list[str]]:
    """Finished tasks in a `tasks.jsonl` (id -> rollouts), and the lines that hold them."""
    done: dict[str, list[EvalRollout]] = {}
    lines = []
    if not path.exists():
        return done, lines
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            done[row["task_id"]] = [EvalRollout.from_json(r) for r in row["rollouts"]]
        except (ValueError, KeyError, TypeError):
            continue  # the line an interruption cut short
        lines.append(line)
    return done, lines


def _task_line(task: Task, rollouts: Sequence[EvalRollout]) -> dict[str, Any]:
    return {"task_id": task.id, "successes": sum(r.success for r in rollouts), "trials": len(rollouts),
            "task": dict(task.row), "rollouts": [r.to_json() for r in rollouts]}


async def _run_tasks(cfg: JobConfig, backend: EmbeddedBackend | EndpointBackend, tasks: Sequence[Task],
                     params: Mapping[str, Any], tasks_path: Path, done: dict[str, list[EvalRollout]]) -> None:
    """Each task's trials together, `agent.concurrency` rollouts at most; a line per finished task."""
    G = cfg.eval.group_size
    limit = asyncio.Semaphore(max(1, cfg.agent.concurrency // G))
    with tasks_path.open("a", encoding="utf-8") as out:

        async def one(task: Task) -> None:
            async with limit:
                trials = await backend.run_task(task, G, params)
            answer = task.row.get(cfg.eval.answer_key)
            rollouts = [grade_rollout(task_id=task.id, trial=i, trajectory_id=t.trajectory_id, turns=t.turns,
                                      error=t.error, failure=t.failure, agent_reward=t.agent_reward, agent_metrics=t.agent_metrics,
                                      latency_s=t.seconds, answer=answer, grader=cfg.eval.grader,
                                      success_threshold=cfg.success_threshold)
                        for i, t in enumerate(trials)]
            out.write(json.dumps(_task_line(task, rollouts), default=str) + "\n")
            out.flush()
            done[task.id] = rollouts

        await asyncio.gather(*(one(t) for t in tasks))


def _details(cfg: JobConfig, spec: ModelSpec, meta: Mapping[str, Any]) -> dict[str, object]:
    return {"model": f"{spec.kind} {spec.target or cfg.model.path or '(built-in tiny model)'}",
            "tasks": cfg.data.test_path, "trials per task": meta["group_size"], "grader": meta["grader"],
            "sampling": meta["inference_params"], "success": f"score >= {cfg.success_threshold:g}"}


def _write_summary(r: EvalResult) -> None:
    r.summary_path.write_text(json.dumps({
        "model": str(r.model), "kind": r.model.kind, "label": r.label, "tasks": r.n_tasks,
        "group_size": r.group_size, "grader": r.grader, "metrics": r.metrics,
        "gate": [asdict(c) for c in r.gate], "passed": r.passed, "tasks_jsonl": str(r.tasks_path),
        "report": str(r.report_path), "mlflow_run_id": r.mlflow_run_id, "usage": run_usage(r.out_dir),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
