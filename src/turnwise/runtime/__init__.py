"""turnwise.runtime: the server agents call.

- `app.create_app(sampler=, chat=, store=, model_name=, default_params=, api_keys=, ...)`: the
  FastAPI app (OpenAI-compatible `/v1/chat/completions` + `/sample`, SSE streaming, the rollout
  feedback routes, inspection, job stats, pull-worker task routes); `server.RuntimeServer` runs
  it on 127.0.0.1 in a background thread.
- `store.TrajectoryStore`: durable trajectories (SQLite, WAL), keyed by job.
- `capture.plan_prompt` / `capture.build_segments`: token-exact multi-turn capture.
- `tasks.TaskQueue`: leases for pull workers.
- `protocols.Sampler` / `protocols.Chat`: what it needs from a policy; `testing` has stand-ins.
"""
