"""Cross-check against an independent implementation: verl's `core_algos` (verl==0.9.1 on PyPI).

Install: `.venv/bin/pip install --no-deps verl==0.9.1` (a pure-Python wheel). Its declared
dependencies cannot come along: they pin transformers<5.11 and pull in ray and tensordict (a
compiled extension built against other torch versions). So this test loads verl's own files
(`trainer/ppo/core_algos.py`, `utils/torch_functional.py`, `utils/groupwise.py`, ...) without
running `verl/__init__.py` (which imports ray), and stands in for what those files import only
as types: the config classes `AlgoConfig` / `ActorConfig`, `omegaconf.DictConfig` and
`tensordict.TensorDict` (each only when not installed). Every formula compared is verl's code.

Documented departures are kept out of the random inputs: groups have at least two rollouts
(verl uses a baseline of 0 for a group of one), `grpo_passk` runs with verl's std normalization
off, and the batch whitening compares with eps=0 here (verl adds 1e-8 to the variance).
`group_based_per_turn` has no counterpart anywhere; with one turn it equals `group_based`
(tested in test_algo_advantages.py).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from turnwise.algo import aggregate, compute_advantages, compute_loss, entropy_from_logits, kl_penalty
from turnwise.config import default_advantage_options, default_loss_options
from turnwise.types import ScoredRollout

pytestmark = pytest.mark.slow
VERL_VERSION = "0.9.1"
D = torch.float64
SEEDS = range(4)


class _Config(dict):
    """Attribute + `.get` access, like the OmegaConf / dataclass configs verl reads."""

    __getattr__ = dict.get
    global_batch_info: dict = {}


@pytest.fixture(scope="module")
def verl():
    spec = importlib.util.find_spec("verl")
    if spec is None:
        pytest.skip(f"verl is not installed: .venv/bin/pip install --no-deps verl=={VERL_VERSION}")
    if importlib.metadata.version("verl") != VERL_VERSION:
        pytest.skip(f"the loader below is written for verl=={VERL_VERSION}")
    root = spec.submodule_search_locations[0]

    def shell(name: str, path: str | None = None, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__path__ = [path] if path else []
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    algo_config = type("AlgoConfig", (_Config,), {})
    actor_config = type("ActorConfig", (_Config,), {})
    for pkg in ["", ".utils", ".trainer", ".trainer.ppo", ".workers"]:
        shell("verl" + pkg, root + pkg.replace(".", "/"))
    shell("verl.trainer.config", AlgoConfig=algo_config)
    shell("verl.workers.config", ActorConfig=actor_config)
    stubs = []
    for missing, attr in [("omegaconf", "DictConfig"), ("tensordict", "TensorDict")]:
        if importlib.util.find_spec(missing) is None:
            shell(missing, **{attr: type(attr, (), {})})
            stubs.append(missing)
    try:
        groupwise = importlib.import_module("verl.utils.groupwise")
        sys.modules["verl.utils"].__dict__.update(as_torch_index=groupwise.as_torch_index,
                                                  group_mean_std=groupwise.group_mean_std)
        core = importlib.import_module("verl.trainer.ppo.core_algos")
        yield types.SimpleNamespace(core=core, F=importlib.import_module("verl.utils.torch_functional"),
                                    AlgoConfig=algo_config, ActorConfig=actor_config)
    finally:
        for name in list(sys.modules):
            if name.split(".")[0] == "verl" or name in stubs:
                del sys.modules[name]


# --- advantages --------------------------------------------------------------------------------


def _random_batch(seed: int):
    """Groups of 2-6 multi-turn rollouts, and verl's padded view of them.

    verl sees one response row per rollout: each turn's sampled tokens (mask 1) followed by
    0-3 tool-result tokens (mask 0); a turn's reward sits on its last sampled token.
    """
    rng = np.random.default_rng(seed)
    rollouts, rows = [], []
    for g in range(rng.integers(3, 8)):
        binary = rng.random() < 0.5
        equal = rng.random() < 0.15
        for i in range(rng.integers(2, 7)):
            turns = int(rng.integers(1, 4))
            lengths = tuple(int(n) for n in rng.integers(1, 6, size=turns))
            if equal:
                rewards = (1.0,)
            elif binary:
                rewards = (float(rng.integers(0, 2)),)
            elif rng.random() < 0.5:
                rewards = tuple(float(x) for x in rng.normal(size=turns).round(3))
            else:
                rewards = (round(float(rng.normal()), 3),)
            rollouts.append(ScoredRollout(f"g{g}", f"t{g}-{i}", rewards, lengths))
            per_turn = list(rewards) if len(rewards) == turns else [0.0] * (turns - 1) + [rewards[0]]
            mask, reward = [], []
            for n, r in zip(lengths, per_turn, strict=True):
                mask += [1] * n
                reward += [0.0] * (n - 1) + [r]
                gap = int(rng.integers(0, 4))
                mask += [0] * gap
                reward += [0.0] * gap
            rows.append((mask, reward))
    width = max(len(m) for m, _ in rows) + 2
    mask_B_T = torch.zeros(len(rows), width, dtype=D)
    reward_B_T = torch.zeros(len(rows), width, dtype=D)
    for b, (m, r) in enumerate(rows):
        mask_B_T[b, : len(m)] = torch.tensor(m, dtype=D)
        reward_B_T[b, : len(r)] = torch.tensor(r, dtype=D)
    index = np.array([r.group_id for r in rollouts], dtype=object)
    return rollouts, reward_B_T, mask_B_T, index


def _ours_vs_verl(ours, verl_B_T, mask_B_T, rtol=1e-9, atol=1e-9):
    assert len(ours) == verl_B_T.shape[0]
    for b, adv in enumerate(ours):
        theirs = verl_B_T[b][mask_B_T[b].bool()]
        np.testing.assert_allclose(np.array(adv), theirs.numpy(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("seed", SEEDS)
def test_advantages_match_verl(verl, seed):
    rollouts, rewards, mask, index = _random_batch(seed)
    core, cfg = verl.core, verl.AlgoConfig

    def ours(name, **kw):
        return compute_advantages(name, rollouts, default_advantage_options(**kw))[0]

    for norm in (True, False):
        theirs, _ = core.compute_grpo_outcome_advantage(rewards.clone(), mask, index, epsilon=1e-6,
                                                        norm_adv_by_std_in_grpo=norm)
        _ours_vs_verl(ours("group_based", normalize_std=norm), theirs, mask)
    _ours_vs_verl(ours("rloo"), core.compute_rloo_outcome_advantage(rewards.clone(), mask, index)[0], mask)
    _ours_vs_verl(ours("opo"), core.compute_opo_outcome_advantage(rewards.clone(), mask, index)[0], mask)
    theirs, _ = core.compute_gpg_outcome_advantage(rewards.clone(), mask, index)
    _ours_vs_verl(ours("gpg"), theirs, mask, rtol=1e-6)  # verl computes alpha in float32
    theirs, _ = core.compute_grpo_passk_outcome_advantage(rewards.clone(), mask, index,
                                                          config=cfg(norm_adv_by_std_in_grpo=False))
    _ours_vs_verl(ours("grpo_passk"), theirs, mask)
    theirs, _ = core.compute_reinforce_plus_plus_baseline_outcome_advantage(rewards.clone(), mask, index)
    _ours_vs_verl(ours("reinforce_pp_baseline", eps=0.0), theirs, mask, rtol=1e-6, atol=1e-7)
    for gamma in (1.0, 0.9):
        theirs, _ = core.compute_reinforce_plus_plus_outcome_advantage(rewards.clone(), mask,
                                                                       config=cfg(gamma=gamma))
        _ours_vs_verl(ours("reinforce_pp", eps=0.0, gamma=gamma), theirs, mask, rtol=1e-6, atol=1e-7)
    # monte_carlo with gamma 1 is ReMax's return with a zero baseline
    theirs, _ = core.compute_remax_outcome_advantage(rewards.clone(), torch.zeros(len(rollouts), dtype=D), mask)
    _ours_vs_verl(ours("monte_carlo", gamma=1.0), theirs, mask)


# --- losses ------------------------------------------------------------------------------------


def _random_tensors(seed: int, B: int = 6, T: int = 9):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen, dtype=D) * 4 - 0.01
    sampler = logp - (torch.rand(B, T, generator=gen, dtype=D) * 1.4 - 0.7)  # ratios in [0.5, 2]
    adv = torch.randn(B, T, generator=gen, dtype=D)
    mask = (torch.rand(B, T, generator=gen) < 0.75).to(D)
    mask[:, 0] = 1.0
    mask[-1] = 0.0  # a fully padded row
    mask[-1, 0] = 0.0
    return logp, sampler, adv, mask


MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _both(ours_fn, verl_fn, logp):
    a = logp.clone().requires_grad_(True)
    loss_a, metrics = ours_fn(a)
    loss_a.backward()
    b = logp.clone().requires_grad_(True)
    loss_b, verl_metrics = verl_fn(b)
    loss_b.backward()
    return (loss_a, a.grad, metrics), (loss_b, b.grad, verl_metrics)


def _close(x, y):
    torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-9)  # verl adds 1e-8 to token counts


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
def test_ppo_cispo_gspo_match_verl(verl, seed, mode):
    logp, sampler, adv, mask = _random_tensors(seed)
    lo, hi = 0.8, 1.2
    cases = [  # (our loss, our options, verl function, verl's clip_ratio_c)
        ("ppo", default_loss_options(loss_agg_mode=mode, clip_ratio_c=3.0), verl.core.compute_policy_loss_vanilla, 3.0),
        ("ppo", default_loss_options(loss_agg_mode=mode), verl.core.compute_policy_loss_vanilla, 1e30),
        ("cispo", default_loss_options(loss_agg_mode=mode), verl.core.compute_policy_loss_cispo, 3.0),
        ("ppo", default_loss_options(loss_agg_mode=mode, ratio_level="sequence", clip_low_threshold=0.97,
                            clip_high_threshold=1.03), verl.core.compute_policy_loss_gspo, 3.0),
    ]
    for name, opts, verl_fn, c in cases:
        lo, hi = opts.clip_low_threshold, opts.clip_high_threshold
        config = verl.ActorConfig(clip_ratio=0.2, clip_ratio_low=1 - lo, clip_ratio_high=hi - 1, clip_ratio_c=c)
        (la, ga, ma), (lb, gb, mb) = _both(
            lambda lp, name=name, opts=opts: compute_loss(name, lp, sampler, adv, mask, opts),
            lambda lp, verl_fn=verl_fn, config=config: verl_fn(sampler, lp, adv, mask, mode, config), logp)
        _close(la, lb)
        _close(ga, gb)
        assert ma["loss/clip_frac"] == pytest.approx(mb["actor/pg_clipfrac"], abs=1e-9)
        if name == "ppo" and opts.clip_ratio_c is not None:
            assert ma["loss/clip_frac_dual"] == pytest.approx(mb["actor/pg_clipfrac_lower"], abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
def test_importance_sampling_and_tis_match_verl(verl, seed, mode):
    logp, sampler, adv, mask = _random_tensors(seed)
    config = verl.ActorConfig(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=1e30)
    # -r*A has the gradient of verl's REINFORCE loss with the detached IS weight r
    (_, ga, _), (_, gb, _) = _both(
        lambda lp: compute_loss("importance_sampling", lp, sampler, adv, mask, default_loss_options(loss_agg_mode=mode)),
        lambda lp: verl.core.compute_policy_loss_reinforce(
            sampler, lp, adv, mask, mode, config, rollout_is_weights=(lp - sampler).exp().detach()), logp)
    _close(ga, gb)
    # TIS: ratio to the trainer's old logprobs, times min(exp(old - sampler), cap)
    old = logp + 0.1 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed), dtype=D)
    weights = (old - sampler).exp().clamp(max=1.5)
    (la, ga, _), (lb, gb, _) = _both(
        lambda lp: compute_loss("ppo", lp, sampler, adv, mask, default_loss_options(loss_agg_mode=mode, tis_cap=1.5),
                                old_logprobs_B_T=old),
        lambda lp: verl.core.compute_policy_loss_vanilla(old, lp, adv, mask, mode, config,
                                                         rollout_is_weights=weights), logp)
    _close(la, lb)
    _close(ga, gb)


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_aggregation_and_entropy_match_verl(verl, seed):
    logp, ref, _, mask = _random_tensors(seed)
    for est in ("k1", "k2", "k3"):
        _close(kl_penalty(logp, ref, est), verl.core.kl_penalty(logp, ref, est))
    loss_B_T = torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed), dtype=D)
    for mode in MODES:
        _close(aggregate(loss_B_T, mask, mode), verl.core.agg_loss(loss_B_T, mask, mode))
        _close(aggregate(loss_B_T, mask, mode, 17.0), verl.core.agg_loss(loss_B_T, mask, mode,
                                                                          loss_scale_factor=17.0))
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(seed), dtype=D)
    _close(entropy_from_logits(logits), verl.F.entropy_from_logits(logits))
