"""The README walk-through, end to end: `turnwise service` as its own process, a tenant, a
shortened training job on the demo environment whose agent is a pull worker calling the job
endpoint with the job's key; the service is SIGKILLed mid-job and started again (the job is
re-attached, no usage lost); describe shows usage in every dimension and cost = usage x prices;
an evaluation job on the trained checkpoint completes; `summary.json` holds the same totals; the
console, in a real headless browser, shows both jobs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from turnwise.client import ServiceClient, read_config

ROOT = Path(__file__).parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DEMO = ROOT / "examples" / "support_desk" / "config.yaml"
PRICES = {"prefill": 0.5, "prefill_cached": 0.05, "sample": 2.0, "train": 1.5}

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}


def _start_service(config: Path, log: Path) -> subprocess.Popen:
    starts = log.read_text().count("turnwise service: http") if log.exists() else 0
    proc = subprocess.Popen([sys.executable, "-m", "turnwise.cli", "service", str(config)], cwd=ROOT, env=_env(),
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while log.read_text().count("turnwise service: http") == starts:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return proc


def _wait_for(client: ServiceClient, job_id: str, condition, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.describe_job(job_id)
        if condition(job):
            return job
        assert job["status"] not in ("Failed", "Stopped"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.5)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory):
    """The walk-through, run once: what each step answered, for the tests below to check."""
    tmp_path = tmp_path_factory.mktemp("walkthrough")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "service.yaml"
    config.write_text(json.dumps({"port": port, "state_dir": str(tmp_path / "state"), "workdir": str(ROOT),
                                  "poll_interval_s": 0.5, "prices": {"*": PRICES},
                                  "mlflow_ui_url": "http://127.0.0.1:5000"}))
    log = tmp_path / "service.log"
    service = _start_service(config, log)
    worker = None
    seen: dict = {"url": url}
    try:
        admin = ServiceClient(url, (tmp_path / "state" / "admin_key").read_text().strip())
        tenant = admin.create_tenant("team-a")
        seen["tenant_key"] = tenant["key"]
        client = ServiceClient(url, tenant["key"])
        rows = (DEMO.parent / "data" / "train.jsonl").read_text().splitlines()
        (tmp_path / "train.jsonl").write_text("\n".join(rows[:4]) + "\n")
        (tmp_path / "val.jsonl").write_text("\n".join(rows[4:6]) + "\n")
        (tmp_path / "demos.jsonl").write_text(
            "\n".join((DEMO.parent / "data" / "demos.jsonl").read_text().splitlines()[:8]) + "\n")
        train_ds = client.upload_dataset(tmp_path / "train.jsonl")
        short = [f"data.train_path={train_ds['ref']}", f"data.val_path={tmp_path / 'val.jsonl'}",
                 f"warm_start.demos_path={tmp_path / 'demos.jsonl'}", "warm_start.epochs=1", "warm_start.batch_size=4",
                 "global_batch_size=2", "group_size=2", "max_steps=2", "val_every=1", "sampling_max_tokens=16",
                 "tracking.progress=false", "save_every=1"]
        job = client.create_job("support-desk-rl", "train", read_config(DEMO),
                                overrides=[*short, "agent.kind=worker", "agent.rollout_timeout=60"])
        worker = subprocess.Popen(
            [sys.executable, "-m", "turnwise.cli", "worker", "--agent", "e2e_agent:agent", "--server",
             job["endpoint"], "--api-key", job["job_key"], "--concurrency", "4"], cwd=ROOT, env=_env(),
            stdout=(tmp_path / "worker.log").open("ab"), stderr=subprocess.STDOUT)

        # SIGKILL the service once the job has trained a step, then start it again
        seen["before_kill"] = _wait_for(client, job["id"], lambda j: j["progress"]["done"] >= 1)
        service.send_signal(signal.SIGKILL)
        service.wait()
        service = _start_service(config, log)
        seen["after_restart"] = client.describe_job(job["id"])
        seen["train"] = client.wait(job["id"], timeout=900, poll_s=1)
        ev = client.create_job("support-desk-eval", "eval", read_config(DEMO), model=f"job:{job['id']}",
                               overrides=["agent.function=e2e_agent:agent", "eval.max_tasks=2", "eval.group_size=2",
                                          "sampling_max_tokens=16", "tracking.progress=false"])
        seen["eval"] = client.wait(ev["id"], timeout=600, poll_s=1)
        seen["jobs"] = client.list_jobs()
        seen["usage"] = client.usage()
        yield seen
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        service.terminate()
        service.wait(30)


def test_walkthrough_train_restart_eval(walkthrough: dict) -> None:
    assert walkthrough["after_restart"]["status"] == "InProgress"  # re-attached, not restarted
    done = walkthrough["train"]
    assert done["status"] == "Completed", (done, Path(done["artifacts"].get("log", "")).read_text()[-3000:])
    assert done["resumes"] == 0 and done["progress"]["done"] == 2
    usage, before = done["usage"], walkthrough["before_kill"]["usage"]
    assert all(usage[k] >= before[k] for k in usage)  # nothing metered before the kill was lost
    assert all(v > 0 for v in usage.values()), usage  # prefill, prefix-cached prefill, sampled, trained
    expected = sum(usage[k] * PRICES[p] for k, p in (("prefill_tokens", "prefill"),
                   ("prefill_cached_tokens", "prefill_cached"), ("sample_tokens", "sample"),
                   ("train_tokens", "train"))) / 1e6
    assert done["cost"]["total"] == pytest.approx(expected)
    summary = json.loads(Path(done["artifacts"]["summary"]).read_text())
    assert summary["usage"] == usage
    assert "checkpoint" in done["artifacts"] and done["artifacts"]["mlflow_run_id"]
    ev = walkthrough["eval"]
    assert ev["status"] == "Completed", ev
    assert ev["progress"]["done"] == 2 and ev["usage"]["sample_tokens"] > 0
    assert ev["usage"]["train_tokens"] == 0 and ev["metrics"]
    assert [j["status"] for j in walkthrough["jobs"]] == ["Completed", "Completed"]
    assert walkthrough["usage"]["total"]["cost"] == pytest.approx(done["cost"]["total"] + ev["cost"]["total"])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_walkthrough_console_shows_both_jobs(walkthrough: dict) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(walkthrough["url"] + "/")
        page.fill("#key", walkthrough["tenant_key"])
        page.click("button[type=submit]")
        page.wait_for_selector(f"tr[data-job='{walkthrough['eval']['id']}']")
        rows = {r.get_attribute("data-job"): [c.inner_text() for c in r.query_selector_all("td")]
                for r in page.query_selector_all("#jobs tbody tr")}
        links = [a.get_attribute("href") for a in page.query_selector_all("#jobs a")]
        browser.close()
    for job in (walkthrough["train"], walkthrough["eval"]):
        cells = rows[job["id"]]
        assert cells[1] == job["name"] and cells[3] == "Completed" and cells[4] == "2 / 2"
        assert float(cells[9]) == pytest.approx(job["cost"]["total"], abs=1e-6)
        assert cells[7] == f"{job['usage']['sample_tokens']:,}"
    assert f"http://127.0.0.1:5000/#/runs/{walkthrough['train']['artifacts']['mlflow_run_id']}" in links
