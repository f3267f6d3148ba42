"""Success metrics over repeated trials of each task.

pass@k (Chen et al. 2021, unbiased): for a task with n trials and c successes,
    pass@k = 1 - C(n-c, k) / C(n, k)      (probability that at least one of k draws succeeds)
pass^k (Yao et al. 2024, tau-bench): C(c, k) / C(n, k)   (probability that all k draws succeed)
Both are averaged over tasks; k must not exceed n.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass^k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return comb(c, k) / comb(n, k)


def mean_pass_at_k(successes: Sequence[int], n: int, k: int) -> float:
    return sum(pass_at_k(n, c, k) for c in successes) / len(successes)


def mean_pass_hat_k(successes: Sequence[int], n: int, k: int) -> float:
    return sum(pass_hat_k(n, c, k) for c in successes) / len(successes)
