"""What a run prints when stdout is not a terminal: one plain line per RL step, one per tenth of
the warm start, validation and checkpoints; nothing from rich."""

from __future__ import annotations

import io
import re

from turnwise.train.progress import Progress


def test_plain_lines_per_step_with_validation_throughput_and_eta():
    out = io.StringIO()
    p = Progress(3, bars=False, lines=True, stream=out, warm_start_lines=2)
    p.start_warm_start(4)
    for k in range(1, 5):
        p.update_warm_start(k, 2.0 / k)
    p.validated(0, 0.25)
    p.start_rl()
    p.update(1, {"reward/mean": 0.5, "reward/pass_rate": 0.375, "speed/tokens_per_s": 1234.4, "speed/step_s": 2.5})
    p.update(2, {"reward/mean": 0.625, "reward/pass_rate": 0.5}, val_reward=0.75)
    p.note("checkpoint step_00002: /runs/x/checkpoints/step_00002")
    p.close()
    lines = out.getvalue().splitlines()
    assert [re.sub(r"ETA \S+", "ETA T", line) for line in lines] == [
        "warm start 2/4  loss 1.000  ETA T",
        "warm start 4/4  loss 0.500  ETA T",
        "before RL  val 0.250",
        "step 1/3  reward 0.500  pass 0.375  tokens/s 1234  2.5 s/step  ETA T",
        "step 2/3  reward 0.625  pass 0.500  val 0.750  ETA T",
        "checkpoint step_00002: /runs/x/checkpoints/step_00002",
    ]
    assert re.search(r"ETA \d+:\d\d:\d\d$", lines[3])


def test_no_lines_when_off():
    out = io.StringIO()
    p = Progress(2, bars=False, lines=False, stream=out)
    p.start_rl()
    p.update(1, {"reward/mean": 0.5})
    assert out.getvalue() == ""
