"""The service's web console in a real headless browser (Debian's chromium, driven by playwright):
a tenant's key typed in, its jobs listed with status, progress, usage, cost and the MLflow link;
another tenant's job absent; a bad key answered with the service's message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from turnwise.client import ServiceClient
from turnwise.runtime.server import RuntimeServer
from turnwise.service.command import build
from turnwise.service.settings import ServiceConfig

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "examples" / "support_desk" / "config.yaml"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")


def test_console_lists_the_tenants_jobs_with_usage_cost_and_mlflow_link(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    svc = ServiceConfig(state_dir=str(tmp_path / "state"), max_concurrent_jobs=0, workdir=str(ROOT), port=0,
                        mlflow_ui_url="http://mlflow.example:5000",
                        prices={"*": {"prefill": 1.0, "prefill_cached": 0.5, "sample": 2.0, "train": 4.0}})
    app, _, admin_key = build(svc)
    with RuntimeServer(app) as server:
        app.state.service.base_url = server.base_url
        admin = ServiceClient(server.base_url, admin_key)
        tenant, other = admin.create_tenant("team-a"), admin.create_tenant("team-b")
        client = ServiceClient(server.base_url, tenant["key"])
        train = client.create_job("rl-run", "train", DEMO)
        ev = client.create_job("eval-run", "eval", DEMO, model="base")
        ServiceClient(server.base_url, other["key"]).create_job("not-yours", "train", DEMO)
        store = app.state.service.store  # what a finished run leaves: usage and its MLflow run
        store.record_usage(train["id"], {"prefill_tokens": 1000, "prefill_cached_tokens": 200,
                                         "sample_tokens": 300, "train_tokens": 500})
        store.update_job(train["id"], status="InProgress", progress={"done": 2, "total": 2})
        store.update_job(train["id"], status="Completed", artifacts={"mlflow_run_id": "abc123"})

        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(server.base_url + "/")
            page.fill("#key", "tw_wrong_key")
            page.click("button[type=submit]")
            page.wait_for_selector("#error:has-text('invalid or revoked API key')")
            page.fill("#key", tenant["key"])
            page.click("button[type=submit]")
            page.wait_for_selector(f"tr[data-job='{ev['id']}']")
            rows = {r.get_attribute("data-job"): [c.inner_text() for c in r.query_selector_all("td")]
                    for r in page.query_selector_all("#jobs tbody tr")}
            link = page.get_attribute(f"tr[data-job='{train['id']}'] a", "href")
            page.screenshot(path=str(tmp_path / "console.png"))
            browser.close()
    assert set(rows) == {train["id"], ev["id"]}  # team-b's job is not listed
    cells = rows[train["id"]]
    assert cells[1:5] == ["rl-run", "train", "Completed", "2 / 2"]
    assert cells[5:9] == ["1,000", "200", "300", "500"]
    assert float(cells[9]) == pytest.approx((1000 * 1 + 200 * 0.5 + 300 * 2 + 500 * 4) / 1e6)
    assert link == "http://mlflow.example:5000/#/runs/abc123"
    assert rows[ev["id"]][1:4] == ["eval-run", "eval", "Pending"] and rows[ev["id"]][9] == "0.000000"
