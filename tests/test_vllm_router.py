"""The vLLM engine's parts that need no vLLM: routing, the server command line, config errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from turnwise.config import ConfigError, JobConfig, load_config
from turnwise.policy.vllm_engine import _completion
from turnwise.policy.vllm_router import Router
from turnwise.policy.vllm_server import VLLMServer, VLLMStartError
from turnwise.types import FinishReason


def test_a_trajectory_stays_on_its_replica_and_new_ones_go_to_the_least_loaded():
    router = Router(3)
    first = [router.pick(f"traj-{i}") for i in range(3)]
    assert sorted(first) == [0, 1, 2]  # spread while all are equally loaded
    router.release(first[1])
    assert router.pick("traj-new") == first[1]  # the only one with room
    assert router.pick("traj-0") == first[0]  # its next turn: the replica holding its prefix
    assert router.load[first[0]] == 2


def test_a_replica_that_is_down_or_failed_the_request_is_skipped():
    router = Router(2)
    home = router.pick("t")
    router.release(home)
    router.set_up(home, False)
    other = 1 - home
    assert router.pick("t") == other  # its home is down: moved, and stays moved
    router.release(other)
    router.set_up(home, True)
    assert router.pick("t") == other
    assert router.pick("u", exclude={0, 1}) is None
    router.set_up(0, False)
    router.set_up(1, False)
    assert router.pick(None) is None


def test_the_server_command_is_token_exact_and_loopback_only(tmp_path: Path):
    server = VLLMServer("python3", tmp_path, dtype="float32", args=["--enforce-eager"], log_path=tmp_path / "log")
    cmd = server.command()
    for flag, value in (("--host", "127.0.0.1"), ("--generation-config", "vllm"),
                        ("--logprobs-mode", "processed_logprobs"), ("--dtype", "float32")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enable-prefix-caching" in cmd and cmd[-1] == "--enforce-eager"


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_server_does_not_outlive_a_killed_trainer(tmp_path: Path):
    """A trainer that is SIGKILLed cannot stop its servers; the kernel does (a stand-in server:
    an "interpreter" that sleeps, started from a thread as a replica restart is)."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 300\n")
    fake.chmod(0o755)
    trainer = subprocess.Popen([sys.executable, "-c", f"""
import threading, time
from pathlib import Path
from turnwise.policy.vllm_server import VLLMServer
def spawn():
    s = VLLMServer({str(fake)!r}, Path({str(tmp_path)!r}), dtype="float32", log_path=Path({str(tmp_path / "log")!r}))
    print(s.start()._proc.pid, flush=True)
t = threading.Thread(target=spawn); t.start(); t.join()  # the spawning thread is gone: the server stays
time.sleep(300)
"""], stdout=subprocess.PIPE, text=True)
    server_pid = int(trainer.stdout.readline())
    time.sleep(0.5)
    os.kill(server_pid, 0)  # alive after its spawning thread ended
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(server_pid, 9)
    pytest.fail("the server outlived its trainer")


def test_a_missing_interpreter_is_a_one_line_error(tmp_path: Path):
    with pytest.raises(VLLMStartError, match="make vllm"):
        VLLMServer(str(tmp_path / "nope" / "python"), tmp_path, dtype="float32", log_path=tmp_path / "log").start()
    from turnwise.rollout.runtime import load_engine

    cfg = load_config(None, ["sampler.backend=vllm", f"sampler.vllm.python={tmp_path / 'nope'}",
                             f"model.cache_dir={tmp_path / 'models'}"])
    with pytest.raises(ConfigError, match="sampler.vllm.python not found.*make vllm"):
        load_engine(cfg)


def test_sampler_backend_is_local_by_default_and_checked():
    assert JobConfig().sampler.backend == "local"
    with pytest.raises(ConfigError, match="sampler.backend"):
        load_config(None, ["sampler.backend=sglang"])
    cfg = load_config(None, ["sampler.backend=vllm", "sampler.vllm.replicas=2", 'sampler.vllm.args=["--enforce-eager"]'])
    assert cfg.sampler.vllm.replicas == 2 and cfg.sampler.vllm.args == ["--enforce-eager"]


def test_a_completions_answer_becomes_a_completion():
    data = {"choices": [{"token_ids": [5, 9], "finish_reason": "stop", "logprobs": {
        "token_logprobs": [-0.5, -0.25], "top_logprobs": [{"token_id:5": -0.5, "token_id:7": -1.5},
                                                          {"token_id:9": -0.25, "token_id:3": -2.0}]}}],
            "usage": {"prompt_tokens": 12, "prompt_tokens_details": {"cached_tokens": 8}}}
    c = _completion(data, version=4, top_k=1)
    assert c.token_ids == (5, 9) and c.logprobs == (-0.5, -0.25) and c.finish_reason is FinishReason.STOP
    assert c.version == 4 and c.prompt_tokens == 4 and c.top_logprobs == (((5, -0.5),), ((9, -0.25),))
    with pytest.raises(RuntimeError, match="abort"):
        _completion({"choices": [{"token_ids": [], "finish_reason": "abort", "logprobs": {}}]}, 0, 0)


def test_the_default_interpreter_is_found_from_any_working_directory(tmp_path, monkeypatch):
    from turnwise.policy.vllm_server import resolve_python

    built = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    if not built.exists():
        pytest.skip("no .venv-vllm in this checkout: run `make vllm`")
    monkeypatch.chdir(tmp_path)
    assert resolve_python(".venv-vllm/bin/python") == str(built)
    assert resolve_python("python3") == "python3"
