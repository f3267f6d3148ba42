"""Rewards and graders over the agent's final `<final_output>{...}</final_output>` JSON object.

A reward returns `Reward(value, metrics)`. Graders here compare the predicted object with a
ground-truth object field by field; only ground-truth fields are checked, extra predicted
fields are ignored.

`exact_match` (strict), with this normalization and nothing more:
- the object is the JSON inside the *last* `<final_output>` block (tag case-insensitive); a
  Markdown code fence around it is tolerated; an invalid last block scores 0 (earlier blocks
  are not consulted);
- keys: compared after `strip()` and `casefold()` ("Order_ID" matches "order_id");
- strings: leading/trailing whitespace removed, internal runs of whitespace collapsed to one
  space; case-sensitive;
- JSON types must match, except that integers and floats compare by value (1 == 1.0);
  "5" != 5, "true" != true, booleans are not numbers, null matches only null;
- nested objects recursively with the same rules (ground-truth keys only); arrays element by
  element, same length, in order.

`lenient_match` reproduces SOP-Bench's published scorer (amazon-science/SOP-Bench,
`evaluation/parser.py`: `_parse_final_output_json` then `compare_decisions(fuzzy_match=True)`):
the last `<final_output>\\s*{...}\\s*</final_output>` match (a block whose content is not an
object is skipped); keys case-insensitive; both values as Python `str(v).lower().strip()`; the
null-likes none, null, na, n/a, nan, unknown and "" all equal each other and nothing else; `_`
and `-` read as spaces; and a value matches if either string contains the other (so
"approved" matches "not approved", as in SOP-Bench). Every ground-truth field must match.
Departure: SOP-Bench falls back to XML tags, bare JSON, Python dicts and plain text when
there is no `<final_output>` object; here that scores 0.

`gold_state_match` is the usual reward of stateful benchmarks (tau-bench): the final state's
hash against the hash the task's gold actions reach from a fresh episode, computed once per
task and cached. `outputs_in_messages` is tau-bench's output check: every required string,
lowercased, is a substring of some assistant message lowercased with its commas removed
("1,234.50" reads as "1234.50").

`field_accuracy` is dense: `format_coef * format_ok + (1 - format_coef) * correct / total`
where `format_ok` means the last block parsed to a JSON object, and fields are compared as
in strict (or lenient) mode. Custom rewards are plain functions returning a `Reward`, a float
or `(float, metrics)`; `score` normalizes any of them, awaiting async ones.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import re
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from turnwise.env.episode import Episode
from turnwise.types import Message, as_messages, json_dumps_canonical

_BLOCK_RE = re.compile(r"<final_output>(.*?)</final_output>", re.DOTALL | re.IGNORECASE)
_SOP_BLOCK_RE = re.compile(r"<final_output>\s*(\{.*?\})\s*</final_output>", re.DOTALL | re.IGNORECASE)
_FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)
_SOP_NULLS = frozenset({"none", "null", "na", "n/a", "nan", "unknown", ""})


@dataclass(frozen=True)
class Reward:
    """A reward's outcome: the scalar the trainer uses and numbers worth logging."""

    value: float
    """The reward."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Named numbers (fields_correct, format_ok, ...)."""


def final_text(output: str | Sequence[Message]) -> str:
    """The text to grade: a string as is, or the last assistant message's content."""
    if isinstance(output, str):
        return output
    return next((m.content for m in reversed(output) if m.role == "assistant"), "")


def extract_final_output(output: str | Sequence[Message]) -> Any | None:
    """The JSON value in the last `<final_output>` block, or None if absent or not JSON."""
    blocks = _BLOCK_RE.findall(final_text(output))
    if not blocks:
        return None
    text = blocks[-1].strip()
    fenced = _FENCE_RE.match(text)
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return None


def _gt(ground_truth: Mapping[str, Any] | str) -> Mapping[str, Any]:
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if not isinstance(gt, Mapping):
        raise TypeError(f"ground truth must be a JSON object, got {type(gt).__name__}")
    return gt


def _fold(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).strip().casefold(): v for k, v in obj.items()}


def _strict_equal(pred: Any, gt: Any) -> bool:
    if isinstance(gt, Mapping):
        if not isinstance(pred, Mapping):
            return False
        folded = _fold(pred)
        return all(k in folded and _strict_equal(folded[k], v) for k, v in _fold(gt).items())
    if isinstance(gt, list):
        return isinstance(pred, list) and len(pred) == len(gt) and all(
            _strict_equal(p, g) for p, g in zip(pred, gt, strict=True))
    if isinstance(gt, str):
        return isinstance(pred, str) and " ".join(pred.split()) == " ".join(gt.split())
    if isinstance(gt, bool) or gt is None:
        return type(pred) is type(gt) and pred == gt
    if isinstance(gt, (int, float)):
        return isinstance(pred, (int, float)) and not isinstance(pred, bool) and pred == gt
    return bool(pred == gt)


def _sop_str(value: Any) -> str:
    return str(value).lower().strip()


def _sop_is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or _sop_str(value) in _SOP_NULLS


def _lenient_equal(pred: Any, gt: Any) -> bool:
    """SOP-Bench `_compare_single_value(fuzzy_match=True)`."""
    if _sop_is_null(pred) or _sop_is_null(gt):
        return _sop_is_null(pred) and _sop_is_null(gt)
    p, g = _sop_str(pred), _sop_str(gt)
    if p == g:
        return True
    p, g = p.replace("_", " ").replace("-", " "), g.replace("_", " ").replace("-", " ")
    return p == g or p in g or g in p


def _compare_fields(pred: Any, gt: Mapping[str, Any], lenient: bool) -> dict[str, bool]:
    """Per ground-truth field: whether the prediction matches it."""
    if not isinstance(pred, Mapping):
        return {k: False for k in gt}
    if lenient:  # SOP-Bench lowercases keys; values become lowercase strings before comparing
        folded = {str(k).lower(): _sop_str(v) for k, v in pred.items()}
        return {k: str(k).lower() in folded and _lenient_equal(folded[str(k).lower()], v) for k, v in gt.items()}
    folded = _fold(pred)
    return {k: str(k).strip().casefold() in folded and _strict_equal(folded[str(k).strip().casefold()], v)
            for k, v in gt.items()}


def _sop_extract(output: str | Sequence[Message]) -> Any | None:
    matches = _SOP_BLOCK_RE.findall(final_text(output))
    if not matches:
        return None
    try:  # SOP-Bench parses only the last match
        value = json.loads(matches[-1].strip())
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _grade(output: str | Sequence[Message], ground_truth: Mapping[str, Any] | str,
           lenient: bool) -> tuple[bool, dict[str, bool]]:
    gt = _gt(ground_truth)
    pred = _sop_extract(output) if lenient else extract_final_output(output)
    format_ok = isinstance(pred, Mapping)
    return format_ok, _compare_fields(pred if format_ok else None, gt, lenient)


def _metrics(format_ok: bool, fields: Mapping[str, bool]) -> dict[str, float]:
    return {"format_ok": float(format_ok), "fields_correct": float(sum(fields.values())),
            "fields_total": float(len(fields))}


def exact_match(output: str | Sequence[Message], ground_truth: Mapping[str, Any] | str) -> Reward:
    """1.0 when every ground-truth field matches in strict mode, else 0.0."""
    format_ok, fields = _grade(output, ground_truth, lenient=False)
    value = float(format_ok and all(fields.values()))
    return Reward(value, {"exact_match": value, **_metrics(format_ok, fields)})


def lenient_match(output: str | Sequence[Message], ground_truth: Mapping[str, Any] | str) -> Reward:
    """1.0 when every ground-truth field matches under SOP-Bench's fuzzy rules, else 0.0."""
    format_ok, fields = _grade(output, ground_truth, lenient=True)
    value = float(format_ok and all(fields.values()))
    return Reward(value, {"lenient_match": value, **_metrics(format_ok, fields)})


def field_accuracy(output: str | Sequence[Message], ground_truth: Mapping[str, Any] | str, *,
                   format_coef: float = 0.1, lenient: bool = False) -> Reward:
    """Dense reward: `format_coef * format_ok + (1 - format_coef) * correct fields / fields`."""
    if not 0.0 <= format_coef <= 1.0:
        raise ValueError("format_coef must be in [0, 1]")
    format_ok, fields = _grade(output, ground_truth, lenient=lenient)
    accuracy = sum(fields.values()) / len(fields) if fields else float(format_ok)
    value = format_coef * format_ok + (1.0 - format_coef) * accuracy
    return Reward(value, {"field_accuracy": accuracy, **_metrics(format_ok, fields)})


def state_match(actual_hash: str, expected_hash: str) -> Reward:
    """1.0 when an episode's final state hash equals the one reached by the gold actions."""
    value = float(actual_hash == expected_hash)
    return Reward(value, {"state_match": value})


ReplayFn = Callable[[Any], "Episode | str | Awaitable[Episode | str]"]
"""Builds a fresh episode for a task and replays its gold actions; returns the episode (verify
then hashes and closes it) or its state hash. Sync or async."""

_gold_hashes: weakref.WeakKeyDictionary[Callable[..., Any], dict[str, str]] = weakref.WeakKeyDictionary()
_gold_inflight: dict[tuple[int, int, str], asyncio.Future[str]] = {}


def _task_key(task: Any) -> str:
    """A task's id (`task.id` or `task["id"]`), else its canonical JSON."""
    tid = task.get("id") if isinstance(task, Mapping) else getattr(task, "id", None)
    return f"id:{tid}" if tid is not None else json_dumps_canonical(task)


async def gold_hash(task: Any, replay_fn: ReplayFn) -> str:
    """The state hash the task's gold actions reach (`replay_fn`), computed once per task and
    replay function; concurrent rollouts of one task wait for the same replay."""
    cache = _gold_hashes.setdefault(replay_fn, {})
    key = _task_key(task)
    if key in cache:
        return cache[key]
    slot = (id(asyncio.get_running_loop()), id(replay_fn), key)
    if slot in _gold_inflight:
        return await asyncio.shield(_gold_inflight[slot])
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    _gold_inflight[slot] = future
    try:
        out = replay_fn(task)
        if inspect.isawaitable(out):
            out = await out
        if isinstance(out, Episode):
            episode = out
            try:
                out = await episode.state_hash_async()
            finally:
                episode.close()
        if not isinstance(out, str):
            raise TypeError(f"replay function {getattr(replay_fn, '__name__', replay_fn)!r} returned "
                            f"{type(out).__name__}; expected an Episode or its state hash")
        cache[key] = out
        future.set_result(out)
        return out
    except BaseException as e:
        future.set_exception(e)
        future.exception()  # retrieved: waiters get it, nobody is warned about it
        raise
    finally:
        del _gold_inflight[slot]


async def gold_state_match(task: Any, replay_fn: ReplayFn, actual: Episode | str) -> Reward:
    """1.0 when `actual` (the rollout's episode, or its state hash) is in the state the task's
    gold actions reach from a fresh episode (`gold_hash`, cached per task), else 0.0."""
    expected = await gold_hash(task, replay_fn)
    got = await actual.state_hash_async() if isinstance(actual, Episode) else actual
    return state_match(got, expected)


def outputs_in_messages(required: Sequence[str], messages: Sequence[Message | Mapping[str, Any]]) -> Reward:
    """1.0 when every required output appears in some assistant message (tau-bench's rule:
    case-insensitive, commas removed from the message), else 0.0; no outputs required is 1.0."""
    if isinstance(required, str):
        raise TypeError("required outputs must be a list of strings, not one string")
    texts = [m.content.lower().replace(",", "")
             for m in (x if isinstance(x, Message) else as_messages([x])[0] for x in messages)
             if m.role == "assistant" and m.content]
    found = [any(str(out).lower() in t for t in texts) for out in required]
    value = float(all(found))
    return Reward(value, {"outputs_match": value, "outputs_found": float(sum(found)),
                          "outputs_total": float(len(found))})


def with_success(reward: Reward, threshold: float = 1.0) -> Reward:
    """Adds `success` (value >= threshold; the config's `success_threshold`) to the metrics."""
    return Reward(reward.value, {**reward.metrics, "success": float(reward.value >= threshold)})


RewardFn = Callable[..., Any]
"""A custom reward: returns a `Reward`, a number, or `(number, metrics)`; may be async."""


async def score(fn: RewardFn, *args: Any, **kwargs: Any) -> Reward:
    """Call a reward function (sync or async) and normalize its result to a `Reward`."""
    out = fn(*args, **kwargs)
    if inspect.isawaitable(out):
        out = await out
    if isinstance(out, Reward):
        return out
    if isinstance(out, tuple) and len(out) == 2:
        return Reward(float(out[0]), dict(out[1]))
    if isinstance(out, (int, float)):
        return Reward(float(out))
    raise TypeError(f"reward {getattr(fn, '__name__', fn)!r} returned {type(out).__name__}; "
                    "expected Reward, a number or (number, metrics)")
