"""Presenting evaluations: the terminal table, the Markdown report and the pass@k curve PNG."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from turnwise.eval.stats import Delta, GateCheck, metric_names

if TYPE_CHECKING:
    from turnwise.eval.job import ComparisonResult, EvalResult

_K_RE = re.compile(r"^eval/pass_(at|hat)_(\d+)$")


def fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return format(v, ("+" if signed else "") + (".1f" if abs(v) >= 100 else ".3f"))


def ordered(metrics: Mapping[str, object]) -> list[str]:
    """Metric names in the documented order (pass@k by k), unknown ones last."""
    ks = sorted({int(m.group(2)) for name in metrics if (m := _K_RE.match(name))})
    known = [n for n in metric_names(ks) if n in metrics]
    return known + sorted(set(metrics) - set(known))


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
    return [line.format(*header), "  ".join("-" * w for w in widths), *(line.format(*r) for r in rows)]


def gate_lines(checks: Sequence[GateCheck]) -> list[str]:
    return [f"gate  {c.metric} {c.op} {c.threshold:g}: {fmt(c.value)}  {'PASS' if c.passed else 'FAIL'}"
            for c in checks]


def render_table(result: EvalResult | ComparisonResult) -> str:
    """The terminal table of one evaluation, or of a comparison (A, B, B - A and its interval)."""
    if hasattr(result, "deltas"):  # a ComparisonResult
        return render_comparison(result.a.label, result.b.label, result.deltas, result.confidence,
                                 _caption(result.b), result.gate)
    lines = _grid(["metric", result.label], [[m, fmt(result.metrics[m])] for m in ordered(result.metrics)])
    return "\n".join([_caption(result), *lines, *gate_lines(result.gate)])


def render_comparison(label_a: str, label_b: str, deltas: Mapping[str, Delta], confidence: float,
                      caption: str = "", gate: Sequence[GateCheck] = ()) -> str:
    ci = f"{confidence:.0%} CI"
    rows = [[m, fmt(d.a), fmt(d.b), fmt(d.delta, signed=True),
             "" if d.low is None else f"[{fmt(d.low, True)}, {fmt(d.high, True)}]"]
            for m, d in ((m, deltas[m]) for m in ordered(deltas))]
    lines = _grid(["metric", label_a, label_b, "delta", ci], rows)
    return "\n".join([c for c in [caption] if c] + lines + gate_lines(gate))


def _caption(r: EvalResult) -> str:
    return f"{r.n_tasks} tasks x {r.group_size} trials, grader {r.grader}"


def plot_pass_curves(path: Path, curves: Mapping[str, Mapping[str, float]], title: str = "") -> Path:
    """pass@k (solid) and pass^k (dashed) against k, one colour and marker per model; k on a log
    scale labelled with the plain numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ks: set[int] = set()
    for i, (label, metrics) in enumerate(curves.items()):
        for kind, style, name in (("at", "-", "pass@k"), ("hat", "--", "pass^k")):
            pts = sorted((int(m.group(2)), v) for n, v in metrics.items()
                         if (m := _K_RE.match(n)) and m.group(1) == kind)
            if pts:
                ks |= {k for k, _ in pts}
                ax.plot(*zip(*pts, strict=True), style, marker="osD^v"[i % 5], markersize=6, linewidth=1.8,
                        color=f"C{i}", label=f"{label}: {name}", alpha=0.9)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    if ks:
        ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    ax.set_xlabel("k (trials per task)")
    ax.set_ylabel("probability")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title or "pass@k (any of k trials passes) and pass^k (all k pass)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown_report(title: str, table: str, plot_name: str, details: Mapping[str, object],
                    failures: Sequence[tuple[str, str]]) -> str:
    """`failures`: (task id, reason) of a few failed trials."""
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in details.items()]
    lines += ["", "```", table, "```", "", f"![pass@k and pass^k]({plot_name})", ""]
    if failures:
        lines += ["## Failed trials", "", "| task | reason |", "|---|---|"]
        lines += [f"| {tid} | {reason.replace('|', '/')[:200]} |" for tid, reason in failures]
        lines.append("")
    return "\n".join(lines)
