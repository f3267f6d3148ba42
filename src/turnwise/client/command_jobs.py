"""`turnwise jobs create|list|describe|stop|logs|usage`: the job service from the shell.

The service URL and key come from --url / --api-key or $TURNWISE_SERVICE_URL / $TURNWISE_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os

from turnwise.client import ServiceClient, ServiceError
from turnwise.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("TURNWISE_SERVICE_URL", "http://127.0.0.1:8100"),
                        help="the service (default: $TURNWISE_SERVICE_URL or http://127.0.0.1:8100)")
    parser.add_argument("--api-key", default=os.environ.get("TURNWISE_API_KEY"),
                        help="a tenant (or admin) key (default: $TURNWISE_API_KEY)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="submit a job; prints it with its job key")
    create.add_argument("name")
    create.add_argument("config", help="the job's turnwise config (YAML)")
    create.add_argument("--category", default="train", help="train | eval (or AgentRFT | AgentRFTEvaluation)")
    create.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--model", help="eval: base, job:<train job id> or a checkpoint directory")
    create.add_argument("--max-runtime-s", type=float, help="stop (with a checkpoint) after this many seconds")
    listing = sub.add_parser("list", help="jobs, one line each")
    listing.add_argument("--status", help="Pending | InProgress | Completed | Failed | Stopping | Stopped")
    for name, text in (("describe", "the job as JSON: status, progress, metrics, usage, cost"),
                       ("stop", "stop the job (it checkpoints, then exits)")):
        sub.add_parser(name, help=text).add_argument("job_id")
    logs = sub.add_parser("logs", help="the job's output")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    usage = sub.add_parser("usage", help="tokens and cost per job in a period")
    usage.add_argument("--start", help="epoch seconds or ISO 8601 (default: the beginning)")
    usage.add_argument("--end", help="epoch seconds or ISO 8601 (default: now)")


def _line(job: dict) -> str:
    p = job["progress"] or {}
    cost = job["cost"]["total"] if job["cost"] else None
    return (f"{job['id']}  {job['name'][:24]:24}  {job['category']:5}  {job['status']:10}  "
            f"{p.get('done', 0)}/{p.get('total', 0):<5}  cost {'n/a' if cost is None else f'${cost:.6f}'}")


def run(args: argparse.Namespace) -> int:
    if not args.api_key:
        raise ConfigError("no API key: pass --api-key or set $TURNWISE_API_KEY")
    try:
        with ServiceClient(args.url, args.api_key) as client:
            return _run(client, args)
    except ServiceError as e:
        raise ConfigError(f"the service said: {e}") from None
    except OSError as e:
        raise ConfigError(str(e)) from None


def _run(client: ServiceClient, args: argparse.Namespace) -> int:
    if args.action == "create":
        job = client.create_job(args.name, args.category, args.config, overrides=args.overrides, model=args.model,
                                max_runtime_s=args.max_runtime_s)
        print(json.dumps(job, indent=2))
    elif args.action == "list":
        for job in client.list_jobs(args.status):
            print(_line(job))
    elif args.action == "describe":
        print(json.dumps(client.describe_job(args.job_id), indent=2))
    elif args.action == "stop":
        print(_line(client.stop_job(args.job_id)))
    elif args.action == "logs":
        for line in client.logs(args.job_id, follow=args.follow):
            print(line, flush=True)
    elif args.action == "usage":
        print(json.dumps(client.usage(args.start, args.end), indent=2))
    return 0


