"""`turnwise serve [CONFIG] [--host H] [--port P]`: the runtime server on its own.

Serves the configured policy (default: the built-in tiny model) with the OpenAI-compatible,
rollout and task routes, recording trajectories in a SQLite store, until SIGINT/SIGTERM. It
prints its base URL first. Beyond loopback it requires `runtime.api_keys`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from turnwise.config import ConfigError, JobConfig, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (default: every default: the tiny model)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set runtime.api_keys=[k1]")
    parser.add_argument("--host", default=None, help="address to bind (default: runtime.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: runtime.port; 0 picks a free one)")
    parser.add_argument("--db", default=None, help="trajectory store (default: OUTPUT_DIR/serve/trajectories.db)")
    parser.add_argument("--job", default=None, help="job id, also the served model name (default: name)")


def _check_binding(cfg: JobConfig, host: str) -> None:
    from turnwise.runtime.server import _is_loopback_host

    if not _is_loopback_host(host) and not cfg.runtime.api_keys:
        raise ConfigError(f"refusing to serve on {host}: beyond loopback the runtime needs API keys; "
                          "set runtime.api_keys in the config or --set 'runtime.api_keys=[<key of 8+ chars>]'")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else JobConfig()
    host = args.host or cfg.runtime.host
    port = cfg.runtime.port if args.port is None else args.port
    _check_binding(cfg, host)  # before the (slow) model load

    from turnwise.policy.chat import ChatFormat
    from turnwise.policy.load import load_policy
    from turnwise.policy.sampler import SamplerEngine
    from turnwise.runtime.app import create_app
    from turnwise.runtime.server import RuntimeServer
    from turnwise.runtime.store import TrajectoryStore

    job_id = args.job or cfg.name
    db = Path(args.db) if args.db else Path(cfg.output_dir) / "serve" / "trajectories.db"
    model, tokenizer = load_policy(cfg.model)
    chat = ChatFormat(tokenizer, cfg.model.chat_format)
    engine = SamplerEngine(model, tokenizer, max_batch_size=cfg.sampler.max_batch_size,
                           stop_token_ids=chat.stop_token_ids)
    store = TrajectoryStore(db, job_id=job_id)
    app = create_app(sampler=engine, chat=chat, store=store,
                     model_name=job_id, default_params=cfg.sampling_params(), api_keys=cfg.runtime.api_keys,
                     max_body_bytes=cfg.runtime.max_body_bytes,
                     opaque_tokens_on_loopback=cfg.runtime.opaque_tokens_on_loopback)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with engine, RuntimeServer(app, host=host, port=port) as server:
        print(f"turnwise runtime serving model {job_id!r} at {server.base_url} "
              f"(OpenAI base URL {server.base_url}/v1; trajectories in {db})", flush=True)
        while not stop.wait(0.5):
            pass
    print("turnwise runtime stopped", file=sys.stderr, flush=True)
    return 0
