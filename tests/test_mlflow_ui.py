"""What a user sees in the MLflow UI after a run, checked in a real headless browser.

A short real run (warm start, two RL steps, then warm start vs RL compared on two test tasks)
logs to a SQLite store; `mlflow server` serves it on a free 127.0.0.1 port; Debian's `chromium`,
driven by playwright, renders the UI (a JavaScript app, so the DOM only exists once rendered)
and the test reads what it shows: the training run's reward charts, the Traces tab listing the
rollouts, the eval runs by name and the comparison's delta metrics. Screenshots go to the test's
temporary directory (and to $TURNWISE_SCREENSHOTS when set).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "examples" / "support_desk" / "config.yaml"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")]


ML = "workflowType=machine_learning"  # the UI's model-training view (its default is the GenAI one)
SECTIONS = ("loss", "reward", "rollout", "speed", "train", "warm_start")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory):
    """A real training run and comparison in MLflow: (tracking URI, train run id, experiment id, registered model)."""
    from turnwise.config import load_config
    from turnwise.eval import compare
    from turnwise.train.job import run_train

    tmp = tmp_path_factory.mktemp("ui")
    rows = (DEMO.parent / "data" / "train.jsonl").read_text().splitlines()
    (tmp / "train.jsonl").write_text("\n".join(rows[:4]) + "\n")
    (tmp / "val.jsonl").write_text("\n".join(rows[4:6]) + "\n")
    (tmp / "demos.jsonl").write_text("\n".join((DEMO.parent / "data" / "demos.jsonl").read_text().splitlines()[:8]) + "\n")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the demo config's agent module is imported from the repository root
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        cfg = load_config(DEMO, [
            f"output_dir={tmp / 'runs'}", f"data.train_path={tmp / 'train.jsonl'}", f"data.val_path={tmp / 'val.jsonl'}",
            f"warm_start.demos_path={tmp / 'demos.jsonl'}", "warm_start.epochs=1", "warm_start.batch_size=4",
            "global_batch_size=2", "group_size=2", "max_steps=2", "val_every=1", "sampling_max_tokens=16",
            "tracking.progress=false", "agent.function=e2e_agent:agent",
            "eval.max_tasks=2", "eval.group_size=2", "eval.max_tokens=8", "eval.bootstrap_samples=20",
        ])
        result, summary = run_train(cfg)
        ckpt = result.run_dir / "checkpoints"
        compare(cfg, str(ckpt / "warm_start"), str(ckpt / "final"), result.run_dir / "eval",
                labels=("warm start", f"RL step {result.steps}"),
                mlflow_tags={"turnwise.train_run_id": summary["mlflow_run_id"]})
    finally:
        os.chdir(cwd)
        sys.path.remove(str(ROOT / "tests"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    experiment = client.get_run(summary["mlflow_run_id"]).info.experiment_id
    return summary["mlflow_tracking_uri"], summary["mlflow_run_id"], experiment, summary["registered_model"], tmp


def test_the_run_is_complete_in_mlflow_and_its_model_loads_back(logged_run):
    uri, run_id, experiment, registered, tmp = logged_run
    from mlflow.tracking import MlflowClient

    from turnwise.track import load_registered_model

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.tags["turnwise.kind"] == "train" and "RL training" in run.data.tags["mlflow.note.content"]
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "summary.json", "reward_curve.png", "rollouts", "checkpoints"} <= top
    assert {"checkpoints/warm_start", "checkpoints/final"} <= {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert "rollouts/step_00001.json" in {a.path for a in client.list_artifacts(run_id, "rollouts")}
    # everything under output_dir: no ./mlruns appears in the working directory
    assert run.info.artifact_uri.startswith((tmp / "runs" / "mlartifacts").as_uri())
    model, tokenizer = load_registered_model(registered, tracking_uri=uri)
    assert model.config.model_type == "qwen2" and tokenizer.chat_template
    runs = client.search_runs([experiment])
    by_name = {r.info.run_name: r for r in runs}
    assert {"eval: warm start", "eval: RL step 2", "compare: warm start vs RL step 2"} <= set(by_name)
    assert all(by_name[n].data.tags["turnwise.train_run_id"] == run_id
               for n in ("eval: warm start", "eval: RL step 2", "compare: warm start vs RL step 2"))


@pytest.fixture(scope="module")
def mlflow_server(logged_run):
    uri = logged_run[0]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start on {base}")
            time.sleep(0.5)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(mlflow_server):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install "
                                     "playwright; the browser is the system chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1900, "height": 1100})
        pg.set_default_timeout(45_000)
        yield pg
        browser.close()


def _shot(pg, tmp_path: Path, name: str) -> None:
    pg.wait_for_timeout(1500)  # charts draw after their data arrives
    pg.screenshot(path=str(tmp_path / name), full_page=True)
    if os.environ.get("TURNWISE_SCREENSHOTS"):
        Path(os.environ["TURNWISE_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(os.environ["TURNWISE_SCREENSHOTS"]) / name)
    assert (tmp_path / name).stat().st_size > 10_000


def test_the_training_run_shows_reward_charts(page, mlflow_server, logged_run, tmp_path):
    _, run_id, experiment, _, _ = logged_run
    page.goto(f"{mlflow_server}/#/experiments/{experiment}/runs/{run_id}/model-metrics?{ML}")
    page.get_by_text("Add chart").first.wait_for()
    body = page.inner_text("body")
    # one section per namespace, in this order (MLflow sorts them by name), not one per metric
    sections = list(dict.fromkeys(line for line in body.splitlines() if line in SECTIONS))
    assert sections == list(SECTIONS), sections
    _shot(page, tmp_path, "mlflow_train_metrics.png")
    page.get_by_placeholder("Search metric charts").fill("reward/")  # charts draw once in view
    page.get_by_text("(reward/mean)").first.wait_for()
    body = page.inner_text("body")
    for chart in ("(reward/mean)", "(reward/pass_rate)", "(reward/val)", "(reward/val_pass_at_1)"):
        assert chart in body, chart
    _shot(page, tmp_path, "mlflow_train_reward_charts.png")


def test_the_traces_tab_lists_rollouts_and_each_step_has_a_table(page, mlflow_server, logged_run, tmp_path):
    _, run_id, experiment, _, _ = logged_run
    page.goto(f"{mlflow_server}/#/experiments/{experiment}/runs/{run_id}/traces?{ML}")
    page.get_by_text("8 of 8").first.wait_for()  # 2 steps x 2 tasks x 2 rollouts, each a trace
    assert page.get_by_text('"verdict"').count() >= 4  # the Response column: verdict, reward, output
    _shot(page, tmp_path, "mlflow_traces.png")
    # every rollout of a step as a table (the Artifacts tab renders log_table files as tables)
    page.goto(f"{mlflow_server}/#/experiments/{experiment}/runs/{run_id}/artifacts/rollouts/step_00001.json?{ML}")
    page.get_by_text("final_output").first.wait_for()
    body = page.inner_text("body")
    assert all(col in body for col in ("expected", "reward", "verdict", "tool_errors"))
    _shot(page, tmp_path, "mlflow_rollout_table.png")


def test_the_eval_runs_carry_their_names_and_the_comparison(page, mlflow_server, logged_run, tmp_path):
    uri, run_id, experiment, _, _ = logged_run
    from mlflow.tracking import MlflowClient

    compare_run = next(r for r in MlflowClient(uri).search_runs([experiment])
                       if r.info.run_name.startswith("compare:"))
    page.goto(f"{mlflow_server}/#/experiments/{experiment}/runs?{ML}")
    page.get_by_text("compare: warm start vs RL step 2").first.wait_for()
    body = page.inner_text("body")
    assert "eval: warm start" in body and "eval: RL step 2" in body and "train: " in body
    assert "turnwise-support_desk" in body  # the registered model, in the training run's Models column
    _shot(page, tmp_path, "mlflow_runs.png")
    page.goto(f"{mlflow_server}/#/experiments/{experiment}/runs/{compare_run.info.run_id}?{ML}")
    page.get_by_text("delta/eval/exact_match").first.wait_for()
    body = page.inner_text("body")
    assert "delta_low/eval/exact_match" in body and "Comparison" in body
    _shot(page, tmp_path, "mlflow_comparison.png")
