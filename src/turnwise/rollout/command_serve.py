"""`turnwise serve [CONFIG] [--host H] [--port P]`: the runtime server on its own.

Serves the configured policy (default: the built-in tiny model) with the OpenAI-compatible,
rollout and task routes, recording trajectories in a SQLite store, until SIGINT/SIGTERM. It
prints its base URL first. Beyond loopback it requires `runtime.api_keys`.
"""

from __future__ import annotations

import argparse
import signal
import socket
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


def _check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror or e} (another server on that port? "
                              "pick another with --port, or --port 0 for a free one)") from None


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else JobConfig()
    host = args.host or cfg.runtime.host
    port = cfg.runtime.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a port is 0 (any free one) to 65535")
    _check_binding(cfg, host)  # before the (slow) model load
    _check_port_free(host, port)

    from turnwise.rollout.runtime import load_engine, runtime_app
    from turnwise.runtime.server import RuntimeServer
    from turnwise.runtime.store import TrajectoryStore

    job_id = args.job or cfg.name
    db = Path(args.db) if args.db else Path(cfg.output_dir) / "serve" / "trajectories.db"
    _, _, chat, engine = load_engine(cfg)
    store = TrajectoryStore(db, job_id=job_id)
    app = runtime_app(cfg, sampler=engine, chat=chat, store=store, model_name=job_id)
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
