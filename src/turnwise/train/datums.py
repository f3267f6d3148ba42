"""Groups of rollouts -> training datums: advantages per token, cut into segments.

Failed rollouts are left out before advantages are computed (so they shift no baseline).
Advantages come back per rollout as one flat token-level tuple over its turns in order;
each segment takes the slice of every turn it contains.
"""

from __future__ import annotations

from collections.abc import Sequence

from turnwise.algo.advantages import compute_advantages
from turnwise.runtime.capture import build_segments
from turnwise.types import AdvantageOptions, Datum, Group, RolloutResult, ScoredRollout, TrajectoryStatus


def usable(r: RolloutResult) -> bool:
    return r.trajectory.status == TrajectoryStatus.REWARDED and bool(r.trajectory.turns)


def groups_to_datums(groups: Sequence[Group], method: str,
                     options: AdvantageOptions) -> tuple[list[Datum], dict[str, float]]:
    rollouts = [(g_index, r) for g_index, g in enumerate(groups) for r in g.rollouts_G if usable(r)]
    if not rollouts:
        return [], {}
    scored = [ScoredRollout(group_id=str(g_index), trajectory_id=r.trajectory.id,
                            rewards=r.trajectory.rewards,
                            completion_lengths=tuple(len(t.completion_ids) for t in r.trajectory.turns))
              for g_index, r in rollouts]
    advantages, metrics = compute_advantages(method, scored, options)
    datums: list[Datum] = []
    n_segments = 0
    for (_, r), adv_flat in zip(rollouts, advantages, strict=True):
        lengths = [len(t.completion_ids) for t in r.trajectory.turns]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        segments = build_segments(r.trajectory)
        n_segments += len(segments)
        for seg in segments:
            offset_in_turn: dict[int, int] = {}
            adv_T = []
            for turn in seg.turn_T:
                if turn < 0:
                    adv_T.append(0.0)
                    continue
                k = offset_in_turn.get(turn, 0)
                adv_T.append(float(adv_flat[starts[turn] + k]))
                offset_in_turn[turn] = k + 1
            datums.append(Datum(segment=seg, advantages_T=tuple(adv_T)))
    metrics = {**metrics, "rollout/segments_per_trajectory": n_segments / len(rollouts)}
    return datums, metrics
