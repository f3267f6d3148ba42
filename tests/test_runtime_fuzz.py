"""Fuzz the runtime server over its own OpenAPI spec with schemathesis: no request gets a 5xx.

A real server on loopback (stub policy), every operation, valid and invalid bodies, headers
and paths (schemathesis's positive and negative generation), a bounded number of examples per
operation so the test takes seconds. The tally is printed at the end (`pytest -s`).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import stub_app

EXAMPLES_PER_OPERATION = 12
TALLY: Counter[str] = Counter()


def _app(path: Path):
    return stub_app(TrajectoryStore(path / "t.db", job_id="job"), reply="ok")


# the spec is the app's own (no server needed to read it); the cases go to a real server
schema = schemathesis.openapi.from_dict(_app(Path(tempfile.mkdtemp(prefix="turnwise-spec-"))).openapi())


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RuntimeServer(_app(tmp_path_factory.mktemp("fuzz"))) as server:
        yield server.base_url
    print(f"\nfuzz: {sum(TALLY.values())} cases, "
          f"{sum(v for k, v in TALLY.items() if k.startswith('5'))} with a 5xx; by status {dict(sorted(TALLY.items()))}")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: schemathesis.Case, server_url: str) -> None:
    response = case.call(base_url=server_url, timeout=10)
    TALLY[str(response.status_code)] += 1
    case.validate_response(response, checks=[not_a_server_error])


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
PAYLOADS = st.fixed_dictionaries({}, optional={k: JSON for k in (
    "instance", "prompt", "metadata", "inference_params", "inferenceParams", "model_name")})


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(payloads=st.lists(PAYLOADS, min_size=1, max_size=4))
def test_whatever_is_queued_the_next_lease_is_no_server_error(server_url: str, payloads: list) -> None:
    # stateful where the spec-driven cases above are not: POST /tasks, then the lease that reads it back
    with httpx.Client(base_url=server_url, timeout=10) as client:
        added = client.post("/tasks", json={"Tasks": [{"Payload": p} for p in payloads]})
        lease = client.post("/tasks/lease", json={"WorkerId": "fuzz", "MaxTasks": 8})
    TALLY[str(added.status_code)] += 1
    TALLY[str(lease.status_code)] += 1
    assert added.status_code < 500 and lease.status_code < 500, (added.text, lease.text)
