"""`turnwise service [CONFIG] [--set key=value ...]`: run the job service until interrupted.

On its first start it creates the admin key, prints it once and writes it to
`<state_dir>/admin_key` (readable by this user only). Stopping the service does not stop its jobs:
they run on, and the next start re-attaches them (`turnwise.service.scheduler`).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from fastapi import FastAPI

from turnwise.config import ConfigError
from turnwise.service.db import ServiceStore
from turnwise.service.executors import make_executor
from turnwise.service.scheduler import Scheduler
from turnwise.service.settings import ServiceConfig, load_service_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="service config YAML (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a service config key (repeatable), e.g. --set max_concurrent_jobs=2")


def bootstrap_admin(store: ServiceStore, state: Path) -> str | None:
    """Create the admin key if there is none: the key (shown once), else None."""
    if store.has_admin_key():
        return None
    _, key = store.create_key("admin")
    path = state / "admin_key"
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


def build(svc: ServiceConfig) -> tuple[FastAPI, Scheduler, str | None]:
    """(the app, its scheduler (not started), the new admin key or None)."""
    from turnwise.service.app import create_service_app

    svc.state_path.mkdir(parents=True, exist_ok=True)
    store = ServiceStore(svc.db_url())
    admin = bootstrap_admin(store, svc.state_path)
    scheduler = Scheduler(svc, store, make_executor(svc.executor, svc.ray_address))
    return create_service_app(svc, store, scheduler), scheduler, admin


def run(args: argparse.Namespace) -> int:
    from turnwise.runtime.server import RuntimeServer

    svc = load_service_config(args.config, args.overrides)
    try:
        app, scheduler, admin = build(svc)
    except ValueError as e:  # e.g. executor ray without ray_address
        raise ConfigError(str(e)) from None
    try:
        server = RuntimeServer(app, host=svc.host, port=svc.port, log_level="warning").start()
    except OSError as e:
        raise ConfigError(f"cannot listen on {svc.host}:{svc.port}: {e.strerror or e}") from None
    app.state.service.base_url = svc.base_url(server.port)
    scheduler.start()
    print(f"turnwise service: {app.state.service.base_url} (state {svc.state_path}, pid {os.getpid()})", flush=True)
    if admin:
        print(f"admin key (shown once, also in {svc.state_path / 'admin_key'}): {admin}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    scheduler.stop()
    server.stop()
    print("turnwise service: stopped (its jobs keep running; a restart re-attaches them)", flush=True)
    return 0
