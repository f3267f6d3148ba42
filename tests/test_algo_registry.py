"""Registries: lookup by name, clear errors, user-registered methods picked by name in config."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import turnwise.algo
from turnwise.algo import (
    ADVANTAGES,
    LOSSES,
    LossInputs,
    UnknownNameError,
    compute_advantages,
    compute_loss,
    get_advantage,
    get_loss,
    register_advantage,
    register_loss,
)
from turnwise.config import JobConfig, default_advantage_options
from turnwise.types import LossOptions, ScoredRollout


def test_unknown_names_fail_with_the_valid_ones():
    with pytest.raises(UnknownNameError) as e:
        get_advantage("grpo")
    assert str(e.value).startswith("unknown advantage_method 'grpo'; valid names: ")
    for name in ADVANTAGES.names():
        assert name in str(e.value)
    with pytest.raises(ValueError, match="unknown loss_fn 'dapo'; valid names: cispo, cross_entropy, "
                                         "importance_sampling, ppo"):
        get_loss("dapo")
    with pytest.raises(KeyError):  # also a KeyError, for callers that treat it as a lookup
        compute_advantages("nope", [], default_advantage_options())


def test_user_advantage_is_picked_by_name_from_config():
    @register_advantage("test_best_of_group")
    def best_of_group(rollouts, opts):
        return [np.full(sum(r.completion_lengths), float(r.rewards[0] == 1.0)) for r in rollouts]

    try:
        cfg = JobConfig(advantage_method="test_best_of_group")
        rs = [ScoredRollout("g", "a", (1.0,), (2,)), ScoredRollout("g", "b", (0.0,), (1,))]
        adv, metrics = compute_advantages(cfg.advantage_method, rs, cfg.advantage_options())
        assert adv == [(1.0, 1.0), (0.0,)]
        assert metrics["train/zero_adv_groups"] == 0.0
        assert get_advantage("test_best_of_group") is best_of_group
    finally:
        ADVANTAGES.unregister("test_best_of_group")


def test_user_advantage_output_is_checked():
    @register_advantage("test_wrong_length")
    def wrong(rollouts, opts):
        return [np.zeros(1) for _ in rollouts]

    try:
        with pytest.raises(RuntimeError, match="'test_wrong_length' returned 1 advantages for trajectory 'a'"):
            compute_advantages("test_wrong_length", [ScoredRollout("g", "a", (1.0,), (2,))], default_advantage_options())
    finally:
        ADVANTAGES.unregister("test_wrong_length")


def test_user_loss_is_picked_by_name_and_gets_the_shared_machinery():
    seen = {}

    @register_loss("test_clipped_is")
    def clipped_is(inp: LossInputs, opts: LossOptions):
        seen["ratio"] = inp.ratio_B_T.detach().clone()
        return -inp.ratio_B_T.clamp(max=opts.clip_high_threshold) * inp.advantages_B_T, {"loss/mine": 1.0}

    try:
        cfg = JobConfig(loss_fn="test_clipped_is", loss_agg_mode="seq-mean-token-sum")
        logp = torch.tensor([[-1.0, -1.0, 0.0]], requires_grad=True)
        sampler = torch.tensor([[-1.0, -1.0 - 0.5, 0.0]])
        adv, mask = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1, 1, 0]])
        loss, m = compute_loss(cfg.loss_fn, logp, sampler, adv, mask, cfg.loss_options())
        assert loss.item() == pytest.approx(-(1.0 + 1.2))  # token-sum of one sequence; exp(0.5) clipped
        assert seen["ratio"][0, 1].item() == pytest.approx(np.exp(0.5))
        assert m["loss/mine"] == 1.0 and m["loss/clip_frac"] == 0.0 and "loss/approx_kl" in m
    finally:
        LOSSES.unregister("test_clipped_is")


def test_names_cannot_be_taken_twice_unless_replaced():
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("group_based")(lambda rollouts, opts: [])
    original = get_loss("ppo")
    register_loss("ppo", replace=True)(original)  # re-registering the same function is allowed
    assert get_loss("ppo") is original


def test_algo_imports_nothing_from_turnwise_but_types():
    algo_dir = Path(turnwise.algo.__file__).parent
    imported = set()
    for path in algo_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {m for m in imported if m.split(".")[0] == "turnwise"}
    assert ours and all(m == "turnwise.types" or m.startswith("turnwise.algo") for m in ours), ours
    assert not imported & {"transformers", "fastapi", "turnwise.policy", "turnwise.train"}


def test_unknown_names_fail_when_the_config_loads_with_the_closest_name(tmp_path):
    from turnwise.config import ConfigError, load_config

    job = tmp_path / "job.yaml"
    job.write_text("loss_fn: cispoo\n")
    with pytest.raises(ConfigError, match="loss_fn: unknown name 'cispoo'; did you mean 'cispo'"):
        load_config(job)
    with pytest.raises(ConfigError, match="advantage_method: unknown name 'grpo'"):
        load_config(None, ["advantage_method=grpo"])


def test_plugins_register_losses_and_advantages_for_any_agent_kind(tmp_path, monkeypatch):
    from turnwise.config import ConfigError, load_config

    (tmp_path / "my_algos.py").write_text(
        "from turnwise.algo import register_advantage, register_loss\n"
        "from turnwise.algo.losses import LOSSES\n"
        "register_loss('plugin_loss')(LOSSES.get('ppo').fn)\n"
        "@register_advantage('plugin_adv')\n"
        "def adv(rollouts, opts):\n"
        "    return [(0.0,) * sum(r.completion_lengths) for r in rollouts], {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = load_config(None, ["plugins=[my_algos]", "loss_fn=plugin_loss", "advantage_method=plugin_adv",
                                 "agent.kind=http", "agent.url=http://127.0.0.1:1"])
        assert (cfg.loss_fn, cfg.advantage_method) == ("plugin_loss", "plugin_adv")
    finally:
        LOSSES.unregister("plugin_loss")
        ADVANTAGES.unregister("plugin_adv")
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_plugin_xyz'"):
        load_config(None, ["plugins=[no_such_plugin_xyz]"])
