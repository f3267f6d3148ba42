"""An agent written with the managed service's own agent SDK (`sagemaker.train.rft` from the
`sagemaker-train` package on PyPI) trains on turnwise unchanged: only its endpoint points here.

The SDK pins packages that conflict with ours (rich, protobuf, ...), so it is not a turnwise
dependency. The agent runs in a subprocess; this test finds the SDK either installed in the
interpreter or in a directory named by $TURNWISE_SAGEMAKER_SDK_PATH, prepared with
`pip install --target DIR sagemaker-train==1.27.0`. Its feedback client signs an opaque bearer
token from AWS credentials, offline (dummy credentials here); the runtime accepts it only from
loopback (`opaque_tokens_on_loopback=True`) while remote callers would need a real key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from turnwise.runtime.capture import build_segments
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import stub_app
from turnwise.types import TrajectoryStatus

AGENT = textwrap.dedent('''
    import json, sys
    import openai
    from sagemaker.train.rft import get_inference_params, make_inference_headers, sagemaker_rft_handler

    @sagemaker_rft_handler
    def agent(payload):
        meta = payload["metadata"]
        client = openai.OpenAI(base_url=meta["endpoint"] + "/v1", api_key="unused", max_retries=0,
                               default_headers=make_inference_headers(meta))
        params = {k: v for k, v in (get_inference_params() or {}).items() if v is not None}
        messages = [{"role": "user", "content": payload["instance"]["question"]}]
        r = client.chat.completions.create(model=payload["model_name"], messages=messages, **params)
        if payload["instance"].get("crash"):
            raise RuntimeError("the agent's tool crashed")
        messages += [r.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "sure?"}]
        client.chat.completions.create(model=payload["model_name"], messages=messages, **params)
        return {"reward": 0.75}

    try:
        agent(json.loads(sys.argv[1]))
    except RuntimeError as e:
        print("agent raised:", e)
''')


def sdk_env() -> dict[str, str] | None:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIDTURNWISEDUMMY", "AWS_SECRET_ACCESS_KEY": "dummy-secret",
           "AWS_DEFAULT_REGION": "us-west-2", "AWS_REGION": "us-west-2", "AWS_EC2_METADATA_DISABLED": "true"}
    extra = os.environ.get("TURNWISE_SAGEMAKER_SDK_PATH")
    if extra:
        env["PYTHONPATH"] = os.pathsep.join([extra, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    probe = subprocess.run([sys.executable, "-c", "import sagemaker.train.rft"], env=env, capture_output=True,
                           timeout=120)
    return env if probe.returncode == 0 else None


def test_managed_agent_sdk_runs_unchanged(tmp_path: Path):
    env = sdk_env()
    if env is None:
        pytest.skip("sagemaker-train is not installed (set TURNWISE_SAGEMAKER_SDK_PATH to a pip --target dir)")
    store = TrajectoryStore(tmp_path / "t.db", "job-1")
    app = stub_app(store, reply="Four.", api_keys=["remote-worker-key"], opaque_tokens_on_loopback=True)
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    with RuntimeServer(app) as server:
        for trajectory_id, crash in (("sdk-ok", False), ("sdk-crash", True)):
            payload = {"instance": {"question": "2+2?", "crash": crash}, "prompt": "2+2?", "model_name": "stub",
                       "metadata": {"job_arn": "arn:aws:sagemaker:us-west-2:123456789012:training-job/job-1",
                                    "trajectory_id": trajectory_id, "endpoint": server.base_url,
                                    "region": "us-west-2"},
                       "inference_params": {"temperature": 0.0, "max_tokens": 32, "top_p": 1.0}}
            done = subprocess.run([sys.executable, str(script), json.dumps(payload)], env=env, capture_output=True,
                                  text=True, timeout=180)
            assert done.returncode == 0, done.stderr[-3000:]

    ok = store.get("sdk-ok")
    assert ok.status == TrajectoryStatus.REWARDED and ok.rewards == (0.75,)
    assert len(ok.turns) == 2 and ok.turns[1].reused_prompt_tokens > 0 and len(build_segments(ok)) == 1
    # the SDK's report_error: complete-rollout(failed), then update-reward(0.0); both accepted
    crashed = store.get("sdk-crash")
    assert crashed.status == TrajectoryStatus.FAILED and crashed.rewards == (0.0,) and len(crashed.turns) == 1
