"""The job service: a long-running server to which teams submit training and evaluation jobs.

- `settings.ServiceConfig`: the service's one config (state, capacity, executor, prices).
- `db.ServiceStore`: tenants, hashed keys, jobs, datasets and usage in SQL (SQLite by default).
- `executors`: how a job's command runs (a local subprocess, or a Ray job).
- `scheduler.Scheduler`: the queue; starts, watches, meters and finishes jobs.
- `app.create_service_app`: the control plane, the per-job data plane and the console.
- `command`: `turnwise service [CONFIG]`.
"""
