"""The web console: one HTML page (`GET /`) that lists a tenant's jobs with status, progress,
usage, cost and a link to each job's MLflow run. It asks for a key (kept in the browser's
localStorage) and reads `GET /jobs` with it, refreshing every few seconds; nothing is rendered
on the server, so the page shows exactly what the API answers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>turnwise jobs</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
 table { border-collapse: collapse; margin-top: 1em; } td, th { border-bottom: 1px solid #ddd; padding: .4em .8em; text-align: left; }
 th { background: #f4f4f4; } .Completed { color: #080; } .Failed { color: #b00; } .InProgress { color: #06c; }
 #error { color: #b00; } code { font-size: 12px; }
</style></head>
<body>
<h1>turnwise jobs</h1>
<form id="login"><input id="key" type="password" size="60" placeholder="API key (tenant or admin)">
<button type="submit">Show jobs</button></form>
<p id="error"></p>
<table id="jobs" hidden><thead><tr><th>job</th><th>name</th><th>category</th><th>status</th><th>progress</th>
<th>prefill</th><th>cached</th><th>sampled</th><th>trained</th><th>cost (USD)</th><th>MLflow</th></tr></thead>
<tbody></tbody></table>
<script>
const fmt = n => Number(n || 0).toLocaleString("en-US");
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td; }
async function refresh() {
  const key = localStorage.getItem("turnwise-key");
  if (!key) return;
  const r = await fetch("/jobs", {headers: {Authorization: "Bearer " + key}});
  const body = await r.json();
  if (!r.ok) { document.getElementById("error").textContent = body.error.message; return; }
  document.getElementById("error").textContent = "";
  const tbody = document.querySelector("#jobs tbody");
  tbody.replaceChildren();
  for (const j of body) {
    const row = tbody.insertRow(); row.dataset.job = j.id;
    cell(row, j.id); cell(row, j.name); cell(row, j.category);
    cell(row, j.status + (j.reason ? " (" + j.reason + ")" : ""), j.status);
    const p = j.progress || {};
    cell(row, p.total ? p.done + " / " + p.total : "");
    cell(row, fmt(j.usage.prefill_tokens)); cell(row, fmt(j.usage.prefill_cached_tokens));
    cell(row, fmt(j.usage.sample_tokens)); cell(row, fmt(j.usage.train_tokens));
    cell(row, j.cost ? j.cost.total.toFixed(6) : "no price");
    const ml = cell(row, "");
    if (j.mlflow_url) { const a = document.createElement("a"); a.href = j.mlflow_url; a.textContent = "run"; ml.append(a); }
    else if (j.artifacts && j.artifacts.mlflow_run_id) { ml.textContent = j.artifacts.mlflow_run_id; }
  }
  document.getElementById("jobs").hidden = false;
}
document.getElementById("login").addEventListener("submit", e => {
  e.preventDefault(); localStorage.setItem("turnwise-key", document.getElementById("key").value); refresh();
});
refresh(); setInterval(refresh, 3000);
</script>
</body></html>
"""


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    return PAGE
