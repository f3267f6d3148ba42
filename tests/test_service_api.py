"""The job service's control and data planes over a real server on loopback, real SQLite and the
real `openai` client: tenants and keys, jobs queued (capacity 0, so nothing starts), datasets,
every cross-tenant and cross-job read and write refused, usage x prices."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from turnwise.client import ServiceClient, ServiceError
from turnwise.rollout.usage import run_usage
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import stub_app
from turnwise.service.command import build
from turnwise.service.settings import ServiceConfig

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "examples" / "support_desk" / "config.yaml"
PRICES = {"*": {"prefill": 1.0, "prefill_cached": 0.1, "sample": 2.0, "train": 3.0}}


@pytest.fixture()
def service(tmp_path: Path):
    svc = ServiceConfig(state_dir=str(tmp_path / "state"), max_concurrent_jobs=0, workdir=str(ROOT), port=0,
                        prices=PRICES)
    app, scheduler, admin = build(svc)
    with RuntimeServer(app) as server:
        app.state.service.base_url = server.base_url
        yield server.base_url, admin, app


def _tenant(url: str, admin: str, name: str) -> tuple[dict, ServiceClient]:
    t = ServiceClient(url, admin).create_tenant(name)
    return t, ServiceClient(url, t["key"])


def test_jobs_queue_describe_filter_stop_and_bad_input(service) -> None:
    url, admin, app = service
    _, a = _tenant(url, admin, "team-a")
    job = a.create_job("rl-1", "AgentRFT", DEMO, overrides=["max_steps=3"])
    assert job["status"] == "Pending" and job["category"] == "train" and job["job_key"].startswith("tw_")
    assert job["progress"]["total"] == 3 and job["endpoint"].endswith(f"/jobs/{job['id']}/runtime")
    assert job["usage"] == {"prefill_tokens": 0, "prefill_cached_tokens": 0, "sample_tokens": 0, "train_tokens": 0}
    assert job["cost"]["total"] == 0.0
    ev = a.create_job("ev-1", "AgentRFTEvaluation", DEMO, model="base")
    assert ev["category"] == "eval" and ev["progress"]["total"] > 0
    assert [j["id"] for j in a.list_jobs("Pending")] == [job["id"], ev["id"]]
    with pytest.raises(ServiceError, match="stop it before deleting its artifacts"):
        a.delete_artifacts(job["id"])
    assert a.stop_job(job["id"])["status"] == "Stopped"
    run_dir = Path(app.state.service.store.job(job["id"]).job_dir) / "run"
    run_dir.mkdir()
    assert a.delete_artifacts(job["id"])["artifacts"]["deleted_at"] > 0 and not run_dir.exists()
    assert [j["id"] for j in a.list_jobs("Stopped")] == [job["id"]]
    assert a.describe_job(job["id"])["reason"] == "stopped by request"
    cases = [
        (dict(category="pretrain"), "unknown job category 'pretrain'"),
        (dict(overrides=["group_sise=4"]), "group_sise"),
        (dict(category="eval", model="job:job-nothere"), "no job 'job-nothere' in this tenant"),
        (dict(category="eval", model="/no/such/checkpoint"), "is not 'base', 'job:<id>' or a checkpoint"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ServiceError) as e:
            a.create_job("bad", **{"config": DEMO, **kwargs})
        assert e.value.status == 400 and message in e.value.message, e.value.message
    with pytest.raises(ServiceError, match="status: 'Running' is not one of"):
        a.list_jobs("Running")
    r = a.http.post("/jobs", json={"name": "x", "unknown": 1})
    assert r.status_code == 400 and "unknown" in r.json()["error"]["message"]


def test_datasets_are_validated_and_private(service, tmp_path: Path) -> None:
    url, admin, _ = service
    _, a = _tenant(url, admin, "team-a")
    _, b = _tenant(url, admin, "team-b")
    good = tmp_path / "tasks.jsonl"
    good.write_text("\n".join((DEMO.parent / "data" / "train.jsonl").read_text().splitlines()[:5]) + "\n")
    ds = a.upload_dataset(good)
    assert ds["rows"] == 5 and ds["ref"].startswith("dataset:")
    (tmp_path / "t.csv").write_text("id,question\n1,a\n2,b\n")
    assert a.upload_dataset(tmp_path / "t.csv")["rows"] == 2
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\nnot json\n')
    with pytest.raises(ServiceError) as e:
        a.upload_dataset(tmp_path / "bad.jsonl")
    assert e.value.status == 400 and "bad.jsonl" in e.value.message
    with pytest.raises(ServiceError, match="use a .jsonl, .csv or .parquet"):
        a.upload_dataset(tmp_path / "t.csv", name="t.txt")
    job = a.create_job("on-upload", "train", DEMO, overrides=[f"data.train_path={ds['ref']}"])
    assert job["status"] == "Pending"
    assert [d["id"] for d in b.datasets()] == []
    with pytest.raises(ServiceError, match="no dataset"):  # B names A's dataset
        b.create_job("steal", "train", {**_demo_doc(), "data": {"train_path": ds["ref"]}})
    with pytest.raises(ServiceError, match="inside the service's state directory"):  # or its file
        b.create_job("steal", "train", {**_demo_doc(), "data": {"train_path": service[2].state.service.store.dataset(ds["id"]).path}})


def _demo_doc() -> dict:
    from turnwise.client import read_config

    return read_config(DEMO)


def test_every_cross_tenant_and_cross_job_access_is_refused(service, tmp_path: Path) -> None:
    url, admin_key, app = service
    ta, a = _tenant(url, admin_key, "team-a")
    tb, b = _tenant(url, admin_key, "team-b")
    ja, jb = a.create_job("a-job", "train", DEMO), b.create_job("b-job", "train", DEMO)
    key_a, key_b = ja["job_key"], jb["job_key"]
    h = lambda key: {"Authorization": f"Bearer {key}"}  # noqa: E731

    # control plane: another tenant's job is not found, whatever the call
    for method, path in [("GET", "/jobs/{}"), ("POST", "/jobs/{}/stop"), ("GET", "/jobs/{}/logs"),
                         ("DELETE", "/jobs/{}/artifacts")]:
        for caller, other in ((a, jb), (b, ja)):
            r = caller.http.request(method, path.format(other["id"]))
            assert r.status_code == 404, (method, path, r.text)
    assert [j["id"] for j in a.list_jobs()] == [ja["id"]] and [j["id"] for j in b.list_jobs()] == [jb["id"]]
    assert a.http.get("/jobs", params={"tenant_id": tb["id"]}).status_code == 404
    assert a.http.get("/usage", params={"tenant_id": tb["id"]}).status_code == 404
    assert a.http.get("/keys", params={"tenant_id": tb["id"]}).status_code == 404
    assert a.http.post("/keys", json={"tenant_id": tb["id"]}).status_code == 404
    assert a.http.delete(f"/keys/{tb['key_id']}").status_code == 404
    assert {k["tenant_id"] for k in a.list_keys()} == {ta["id"]}
    # tenant keys cannot manage tenants; job keys cannot use the control plane at all
    assert a.http.post("/tenants", json={"name": "x"}).status_code == 403
    assert a.http.get("/tenants").status_code == 403
    for path in ("/jobs", f"/jobs/{ja['id']}", "/usage", "/datasets", "/keys"):
        assert httpx.get(url + path, headers=h(key_a)).status_code in (403, 404), path
    assert httpx.post(url + "/jobs", json={"name": "x"}, headers=h(key_a)).status_code == 403
    assert httpx.get(url + "/jobs", headers=h("tw_nokey_secret")).status_code == 401
    assert httpx.get(url + "/jobs").status_code == 401
    # the admin sees both
    admin = ServiceClient(url, admin_key)
    assert {j["id"] for j in admin.list_jobs()} == {ja["id"], jb["id"]}

    # data plane: each job's runtime is a real runtime server; mark the jobs running on them
    store = app.state.service.store
    servers, stores = [], {}
    for job in (ja, jb):
        row = store.job(job["id"])
        run_dir = Path(row.job_dir) / "run" / "r"
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text("{}\n")  # what marks a training run's directory
        stores[job["id"]] = TrajectoryStore(run_dir / "trajectories.db", job_id="r")
        server = RuntimeServer(stub_app(stores[job["id"]], reply=f"hello from {job['name']}",
                                        api_keys=[row.runtime_key])).start()
        servers.append(server)
        store.update_job(job["id"], status="InProgress", runtime_port=server.port, run_dir=str(run_dir))
    try:
        def chat(base: str, key: str, traj: str = "t1", **headers: str):
            client = openai.OpenAI(base_url=base, api_key=key, max_retries=0,
                                   default_headers={"X-Amzn-SageMaker-Trajectory-Id": traj, **headers})
            return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])

        reply = chat(f"{url}/jobs/{ja['id']}/runtime/v1", key_a)
        assert reply.choices[0].message.content == "hello from a-job"
        assert chat(f"{url}/v1", key_b).choices[0].message.content == "hello from b-job"  # routed by the key
        stream = openai.OpenAI(base_url=f"{url}/jobs/{ja['id']}/runtime/v1", api_key=key_a, max_retries=0,
                               default_headers={"X-Amzn-SageMaker-Trajectory-Id": "t2"}).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "hello from a-job"
        for base, key, headers in [
            (f"{url}/jobs/{jb['id']}/runtime/v1", key_a, {}),  # A's key on B's path
            (f"{url}/jobs/{ja['id']}/runtime/v1", key_b, {}),
            (f"{url}/v1", key_a, {"X-Amzn-SageMaker-Job-Arn": f"arn:aws:sagemaker:local:0:job/{jb['id']}"}),
            (f"{url}/jobs/{ja['id']}/runtime/v1", ta["key"], {}),  # a tenant key is not a job key
            (f"{url}/jobs/{ja['id']}/runtime/v1", admin_key, {}),
        ]:
            with pytest.raises(openai.PermissionDeniedError):
                chat(base, key, **headers)
        with pytest.raises(openai.AuthenticationError):
            chat(f"{url}/v1", "tw_0000_wrong")
        # reads and writes of the other job's trajectories
        assert httpx.get(f"{url}/jobs/{jb['id']}/runtime/trajectories/t1", headers=h(key_a)).status_code == 403
        assert httpx.get(f"{url}/jobs/{ja['id']}/runtime/trajectories/t1", headers=h(key_a)).status_code == 200
        done = {"TrajectoryId": "t1", "Status": "COMPLETED"}
        assert httpx.post(f"{url}/jobs/{jb['id']}/runtime/complete-rollout", json=done, headers=h(key_a)).status_code == 403
        assert httpx.post(f"{url}/complete-rollout", json=done, headers={
            **h(key_a), "X-Amzn-SageMaker-Job-Arn": jb["id"]}).status_code == 403
        assert httpx.post(f"{url}/jobs/{ja['id']}/runtime/tasks", json={"Tasks": []}, headers=h(key_a)).status_code == 403
        assert httpx.post(f"{url}/jobs/{ja['id']}/runtime/tasks/lease", json={"WorkerId": "w", "MaxTasks": 1},
                          headers=h(key_a)).status_code == 200
        assert [t.id for t in stores[ja["id"]].list()] == ["t1", "t2"] and [t.id for t in stores[jb["id"]].list()] == ["t1"]
        # a revoked job key stops working at once
        a_key_id = key_a.split("_")[1]
        a.revoke_key(a_key_id)
        with pytest.raises(openai.AuthenticationError):
            chat(f"{url}/jobs/{ja['id']}/runtime/v1", key_a, traj="t3")

        # metering: the run directory's turns, counted once, priced by the table
        scheduler = app.state.service.scheduler
        store.update_job(ja["id"], handle="")  # no process: metering only (the watch then fails it, as lost)
        used = run_usage(Path(store.job(ja["id"]).run_dir))
        assert used["sample_tokens"] == 2 * (len(b"hello from a-job") + 1) and used["prefill_tokens"] > 0
        scheduler.tick()
        scheduler.tick()
        described = a.describe_job(ja["id"])
        assert described["usage"] == used
        assert described["status"] == "Failed" and "no checkpoint" in described["reason"]
        expected = used["prefill_tokens"] * 1.0 + used["prefill_cached_tokens"] * 0.1 + used["sample_tokens"] * 2.0
        assert described["cost"]["total"] == pytest.approx(expected / 1e6)
        report = a.usage()
        assert [r["job_id"] for r in report["jobs"]] == [ja["id"]] and report["total"]["usage"] == used
        assert a.usage(start="2100-01-01T00:00:00")["jobs"] == []
        assert [r["job_id"] for r in b.usage()["jobs"]] == [jb["id"]]  # its own job only
    finally:
        for server in servers:
            server.stop()


def test_jobs_command_and_bad_input_are_one_line_errors(service, capsys, tmp_path: Path) -> None:
    from turnwise.cli import main

    url, admin, app = service
    t, a = _tenant(url, admin, "team-a")
    base = ["jobs", "--url", url, "--api-key", t["key"]]
    assert main([*base, "create", "rl-cli", str(DEMO), "--set", "max_steps=2"]) == 0
    job_id = json.loads(capsys.readouterr().out)["id"]
    assert main([*base, "list", "--status", "Pending"]) == 0
    assert job_id in capsys.readouterr().out
    assert main([*base, "describe", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["progress"]["total"] == 2
    (Path(app.state.service.store.job(job_id).job_dir) / "log.txt").write_text("line one\nline two\n")
    assert main([*base, "logs", job_id]) == 0
    assert capsys.readouterr().out.splitlines() == ["line one", "line two"]
    assert main([*base, "stop", job_id]) == 0 and "Stopped" in capsys.readouterr().out
    assert main([*base, "logs", job_id, "--follow"]) == 0  # a finished job's log ends the stream
    assert capsys.readouterr().out.splitlines() == ["line one", "line two"]
    assert main([*base, "usage"]) == 0 and json.loads(capsys.readouterr().out)["jobs"] == []
    for argv, message in [
        (["jobs", "--url", url, "--api-key", "tw_bad_key", "list"], "HTTP 401: invalid or revoked API key"),
        ([*base, "describe", "job-nope"], "HTTP 404: no job 'job-nope'"),
        ([*base, "create", "x", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["jobs", "--url", "http://127.0.0.1:9", "--api-key", "k", "list"], "cannot reach http://127.0.0.1:9"),
        (["service", "--set", "max_concurrent_jobs=-1"], "service config: max_concurrent_jobs"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
