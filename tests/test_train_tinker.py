"""`trainer.backend: tinker` against a real Tinker-API server: SkyRL's (`skyrl==0.3.0`, JAX on
the CPU, its own virtualenv from `make skyrl`), on loopback, with the official SDK (`tinker==0.24.1`).

The model is a 2-layer Qwen3-shaped one with random weights and Qwen3's real tokenizer, built from
the shipped fixtures (`tests/skyrl_server.random_qwen3`): SkyRL's JAX backend implements Qwen3 and
loads a local Hugging Face directory, and hidden size 64 keeps the CPU fast enough.

Tolerance: the logprob the runtime recorded for every sampled token and the one the server's
trainer computes for it before the update agree within 1e-3 (seen: ~2e-6, float32 on both sides).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from skyrl_server import MISSING, VENV_PYTHON, random_qwen3, run_server, stop_server
from turnwise.algo.losses import compute_loss
from turnwise.config import ConfigError, default_loss_options, load_config
from turnwise.train.backend import pad_datums
from turnwise.train.tinker_backend import builtin_loss, datum_scales, open_tinker, reduction_scales, to_tinker
from turnwise.types import Datum, Segment

DEMO = Path(__file__).parent.parent / "examples" / "support_desk" / "config.yaml"
TOLERANCE = 1e-3
KEY = "tml-turnwise-test"  # the SDK wants a tml- key; SkyRL's server checks none


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    if not VENV_PYTHON.is_file():
        pytest.skip(MISSING)
    from family_fixtures import qwen_dir

    work = tmp_path_factory.mktemp("skyrl")
    model = random_qwen3(work / "model", qwen_dir())
    proc, url = run_server(model, work)
    try:
        yield url, model
    finally:
        stop_server(proc)


def job(tmp_path: Path, url: str, model: Path, *extra: str):
    rows = (DEMO.parent / "data" / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:2]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(rows[2:3]) + "\n")
    return load_config(DEMO, [
        f"output_dir={tmp_path / 'runs'}", f"data.train_path={tmp_path / 'train.jsonl'}",
        # no warm start: the demos' long prompts would cost the server one more JIT compile (~1 min)
        f"data.val_path={tmp_path / 'val.jsonl'}", "warm_start.demos_path=null", "global_batch_size=2",
        "group_size=2", "max_epochs=2", "val_every=0", "tinker.loss_reduction=sequence_mean",
        "sampling_max_tokens=12", "tracking.progress=false", "tracking.mlflow=false", "agent.function=e2e_agent:agent",
        f"model.path={model}", "trainer.backend=tinker", "sampler.backend=tinker", f"tinker.base_url={url}",
        f"tinker.api_key={KEY}", f"tinker.base_model={model}", "lora_rank=8", "learning_rate=1e-2", *extra])


@pytest.mark.slow
@pytest.mark.timeout(1500)  # JAX compiles each new batch shape on the server: minutes under load
def test_two_steps_against_skyrl_resume_and_export(server, tmp_path: Path, monkeypatch):
    from turnwise.train.job import run_train

    url, model = server
    monkeypatch.chdir(Path(__file__).parent.parent)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    first, _ = run_train(job(tmp_path, url, model, "max_steps=1"))
    assert first.steps == 1
    run_dir = first.run_dir
    state = json.loads((run_dir / "checkpoints" / "step_00001" / "model" / "tinker_state.json").read_text())
    assert state["state_path"].startswith("tinker://") and state["policy_version"] == 2
    # resume: the server's saved weights and Adam state, then one more step
    second, _ = run_train(job(tmp_path, url, model, "max_steps=2"), resume_dir=run_dir)
    assert (second.start_step, second.steps) == (1, 2)

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {m["step"]: m for m in metrics if "train/policy_version" in m}
    assert [steps[s]["train/policy_version"] for s in (1, 2)] == [2.0, 3.0]  # versions continue across resume
    for s in (1, 2):  # the recorded sampler logprobs are the server's own, token for token
        assert steps[s]["train/logprob_mismatch_max"] < TOLERANCE, steps[s]
        for name in ("rollout/prefill_tokens", "rollout/sample_tokens", "train/tokens", "speed/server_train_s",
                     "speed/server_sample_s"):
            assert steps[s][name] > 0, name
    from turnwise.track.names import reduction

    assert not [k for m in metrics for k in m if k != "step" and reduction(k) is None]
    db = sqlite3.connect(run_dir / "trajectories.db")
    versions = {v for (v,) in db.execute("select version from turns")}
    assert versions <= {1, 2, 3} and len(versions) >= 2
    prefill, sampled = db.execute("select sum(prefill_tokens), sum(sample_tokens) from trajectories").fetchone()
    assert prefill > 0 and sampled > 0
    # the final adapter came back from the server, merged into the base: an HF directory that moved
    final = run_dir / "checkpoints" / "final"
    assert json.loads((final / "tinker_state.json").read_text())["sampler_path"].startswith("tinker://")
    base, trained = load_file(model / "model.safetensors"), load_file(final / "model.safetensors")
    assert any(not torch.equal(base[k], trained[k]) for k in base if k in trained)


def _datums() -> list[Datum]:
    """Two short sequences with sampled tokens (mask 1) after a prompt, different lengths."""
    out = []
    for n_prompt, n_sampled, adv in ((5, 4, 1.0), (3, 7, -0.5)):
        n = n_prompt + n_sampled
        tokens = tuple(100 + 7 * i for i in range(n))
        mask = (0,) * n_prompt + (1,) * n_sampled
        seg = Segment("t", tokens, mask, tuple(-11.9 * m for m in mask), tuple(0 if m else -1 for m in mask),
                      tuple(1 if m else -1 for m in mask))
        out.append(Datum(seg, tuple(adv * m for m in mask)))
    return out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_builtin_losses_equal_ours_on_the_server(server):
    """The server's own per-token losses, summed over our scaled inputs, are our aggregated loss
    (token-mean and seq-mean-token-mean), with the server's logprobs."""
    from turnwise.policy.tinker import connect

    url, model = server
    client = connect(url, KEY).create_lora_training_client(base_model=str(model), rank=8, seed=0)
    datums = _datums()
    cases = [(f, "token-mean") for f in ("ppo", "cispo", "importance_sampling", "cross_entropy")]
    for loss_fn, mode in [*cases, ("ppo", "seq-mean-token-mean")]:
        options = default_loss_options(loss_agg_mode=mode, clip_low_threshold=0.9, clip_high_threshold=1.1)
        name, config = builtin_loss(loss_fn, options)
        data = [to_tinker(d, loss_fn, c) for d, c in zip(datums, datum_scales(datums, options), strict=True)]
        out = client.forward(data, name, config).result()
        server_loss = sum(sum(o["elementwise_loss"].data) for o in out.loss_fn_outputs)
        t = pad_datums(datums)
        lp = torch.zeros_like(t["mask_B_T"])
        for i, o in enumerate(out.loss_fn_outputs):
            lp[i, 1:len(datums[i].segment.tokens_T)] = torch.tensor(o["logprobs"].data)
        ours, _ = compute_loss(loss_fn, lp, t["sampler_logprobs_B_T"], t["advantages_B_T"], t["mask_B_T"], options)
        assert server_loss == pytest.approx(float(ours), rel=1e-4, abs=1e-6), (loss_fn, mode, server_loss)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sequence_mean_reduction_is_undone(server):
    """SkyRL's JAX backend divides each datum's loss by its target count and averages over the
    datums (`tinker.loss_reduction: sequence_mean`); with `reduction_scales` its gradient is that of
    the summed per-token terms, so masked trailing tokens and a zero-advantage datum change nothing."""
    import tinker

    from turnwise.policy.tinker import connect

    url, model = server
    client = connect(url, KEY).create_lora_training_client(base_model=str(model), rank=8, seed=0)

    def grad_norm(datums: list[Datum], undo: bool) -> float:
        scales = reduction_scales(datums, "importance_sampling", "sequence_mean") if undo else [1.0] * len(datums)
        client.forward_backward([to_tinker(d, "importance_sampling", c) for d, c in zip(datums, scales, strict=True)],
                                "importance_sampling").result()
        metrics = client.optim_step(tinker.AdamParams(learning_rate=0.0)).result().metrics
        return next(v for k, v in metrics.items() if k.endswith("grad_norm"))

    d, other = _datums()
    seg = d.segment
    longer = Datum(Segment("t", seg.tokens_T + (300, 301, 302, 303, 304, 305), seg.loss_mask_T + (0,) * 6,
                           seg.logprobs_T + (0.0,) * 6, seg.turn_T + (-1,) * 6, seg.versions_T + (-1,) * 6),
                   d.advantages_T + (0.0,) * 6)
    zero = Datum(other.segment, (0.0,) * len(other.advantages_T))
    alone, padded = grad_norm([d], True), grad_norm([longer, zero], True)
    assert alone > 0 and padded == pytest.approx(alone, rel=1e-3)
    # without the scales the server's own reduction shows: 2 datums, 14 targets against 8
    raw_alone, raw_padded = grad_norm([d], False), grad_norm([longer, zero], False)
    assert raw_alone / raw_padded == pytest.approx(2 * 14 / 8, rel=1e-3)


def test_builtin_mapping_and_scales():
    """Which options the built-ins can take, and each datum's share of the aggregate."""
    options = default_loss_options()
    assert builtin_loss("ppo", options) == ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    assert builtin_loss("cross_entropy", options) == ("cross_entropy", None)
    for changed in ({"clip_ratio_c": 3.0}, {"ratio_level": "sequence"}, {"tis_cap": 2.0}, {"kl_coef": 0.1}):
        assert builtin_loss("ppo", default_loss_options(**changed)) is None, changed  # our loss, client-side
    datums = _datums()  # 4 and 7 loss tokens
    assert datum_scales(datums, options) == [1 / 11, 1 / 11]
    assert datum_scales(datums, default_loss_options(loss_agg_mode="seq-mean-token-mean")) == [1 / 8, 1 / 14]
    assert datum_scales(datums, default_loss_options(loss_agg_mode="seq-mean-token-sum")) == [0.5, 0.5]
    d = to_tinker(datums[0], "ppo", 0.5)
    assert d.model_input.to_ints() == list(datums[0].segment.tokens_T[:-1])
    assert list(d.loss_fn_inputs["target_tokens"].data) == list(datums[0].segment.tokens_T[1:])
    assert list(d.loss_fn_inputs["advantages"].data) == [0.0] * 4 + [0.5] * 4
    assert reduction_scales(datums, "ppo", "sum") == [1.0, 1.0]
    assert reduction_scales(datums, "ppo", "sequence_mean") == [8 * 2, 9 * 2]  # targets x datums
    assert reduction_scales(datums, "cross_entropy", "sequence_mean") == [1.0, 1.0]


def test_tinker_backend_config_errors(tmp_path: Path):
    from turnwise.rollout.runtime import tinker_engine

    with pytest.raises(ConfigError, match="tinker.base_model"):
        tinker_engine(load_config(None, ["sampler.backend=tinker", f"model.path={tmp_path}"]))
    with pytest.raises(ConfigError, match="model.path"):
        tinker_engine(load_config(None, ["sampler.backend=tinker", "tinker.base_model=x"]))
    with pytest.raises(ConfigError, match="forward_backward_custom"):  # refused before any connection
        open_tinker(load_config(None, ["trainer.backend=tinker", "tinker.loss_reduction=sequence_mean",
                                       "clip_ratio_c=3.0"]), None)
