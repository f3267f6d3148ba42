"""TrajectoryStore: lifecycle, idempotency, durability across reopen, threads, job separation."""

from __future__ import annotations

import threading

import pytest

from turnwise.runtime.store import ClientTokenConflict, TrajectoryStore, TransitionError, UnknownTrajectory
from turnwise.types import FinishReason, Message, ToolCall, TrajectoryStatus, Turn


def make_turn(prompt: tuple[int, ...] = (1, 2, 3), completion: tuple[int, ...] = (4, 5), reused: int = 0) -> Turn:
    call = ToolCall(id="call_1", name="lookup", arguments='{"q": "x"}')
    return Turn(index=99, prompt_ids=prompt, completion_ids=completion, logprobs=tuple(-0.25 for _ in completion),
                version=3, finish_reason=FinishReason.STOP,
                message=Message(role="assistant", content="", tool_calls=(call,)),
                reused_prompt_tokens=reused, request_messages=(Message(role="user", content="hi"),))


@pytest.fixture
def store(tmp_path):
    s = TrajectoryStore(tmp_path / "runs" / "t.db", job_id="job-a")
    yield s
    s.close()


def test_turns_round_trip_exactly_and_get_indexes(store):
    store.begin("t1", [{"type": "function", "function": {"name": "lookup"}}])
    first = store.append_turn("t1", make_turn())
    second = store.append_turn("t1", make_turn(prompt=(1, 2, 3, 4, 5, 6), completion=(7,), reused=5),
                               prefill_tokens=1)
    assert (first.index, second.index) == (0, 1)  # the store assigns positions
    t = store.get("t1")
    assert t.status == TrajectoryStatus.IN_PROGRESS and t.job_id == "job-a"
    assert t.turns == (first, second)
    assert t.turns[0].message.tool_calls[0].arguments == '{"q": "x"}'  # never re-serialized
    assert t.tools[0]["function"]["name"] == "lookup"
    assert store.get("t1", last_turn_only=True).turns == (second,)
    usage = store.usage("t1")
    assert (usage.prefill_tokens, usage.sample_tokens, usage.reused_prompt_tokens, usage.turns) == (4, 3, 5, 2)
    assert store.get("nope") is None


def test_lifecycle_and_invalid_transitions(store):
    store.begin("t1")
    store.append_turn("t1", make_turn())
    with pytest.raises(TransitionError, match="not in valid status"):
        store.set_rewards("t1", [1.0])  # before complete-rollout
    store.complete("t1", TrajectoryStatus.READY)
    with pytest.raises(TransitionError, match="not in valid status"):
        store.append_turn("t1", make_turn())
    with pytest.raises(TransitionError, match="not in valid status"):
        store.complete("t1", "failed")
    store.set_rewards("t1", 0.5)
    t = store.get("t1")
    assert t.status == TrajectoryStatus.REWARDED and t.rewards == (0.5,)
    with pytest.raises(TransitionError, match="not in valid status"):
        store.set_rewards("t1", [1.0])


def test_rewards_validation(store):
    store.begin("t1")
    store.append_turn("t1", make_turn())
    store.append_turn("t1", make_turn())
    store.complete("t1", "ready")
    for bad in ([float("nan")], [float("inf")], [], [1.0, 2.0, 3.0]):
        with pytest.raises(ValueError):
            store.set_rewards("t1", bad)
    store.set_rewards("t1", [0.25, 0.75])  # one per turn
    assert store.get("t1").rewards == (0.25, 0.75)


def test_unknown_trajectory_raises_keyerror(store):
    for call in (lambda: store.complete("x", "ready"), lambda: store.set_rewards("x", 1.0),
                 lambda: store.append_turn("x", make_turn()), lambda: store.usage("x")):
        with pytest.raises(UnknownTrajectory) as info:
            call()
        assert isinstance(info.value, KeyError) and "unknown trajectory 'x'" in str(info.value)


def test_client_token_makes_retries_noops(store):
    store.begin("t1")
    store.append_turn("t1", make_turn())
    store.complete("t1", "ready", client_token="c1")
    store.complete("t1", "ready", client_token="c1")  # retry: no-op
    with pytest.raises(ClientTokenConflict):
        store.complete("t1", "failed", client_token="c1")
    store.set_rewards("t1", [1.0], client_token="r1")
    store.set_rewards("t1", [1.0], client_token="r1")
    store.complete("t1", "ready", client_token="c1")  # even after it was rewarded
    with pytest.raises(ClientTokenConflict):
        store.set_rewards("t1", [0.0], client_token="r1")
    with pytest.raises(TransitionError):
        store.set_rewards("t1", [1.0], client_token="other")
    assert store.get("t1").rewards == (1.0,)


def test_failed_trajectory_keeps_status_but_takes_one_reward(store):
    # The managed agent SDK's report_error: complete-rollout(failed), then update-reward(0.0).
    store.begin("t1")
    store.complete("t1", "failed", error="tool crashed")
    store.set_rewards("t1", 0.0)
    t = store.get("t1")
    assert (t.status, t.rewards, t.error) == (TrajectoryStatus.FAILED, (0.0,), "tool crashed")
    with pytest.raises(TransitionError, match="not in valid status"):
        store.set_rewards("t1", 0.0)


def test_everything_survives_reopen(tmp_path):
    path = tmp_path / "t.db"
    s = TrajectoryStore(path, "job-a")
    s.begin("t1")
    turn = s.append_turn("t1", make_turn())
    s.complete("t1", "ready", client_token="c")
    s.set_rewards("t1", [2.0])
    s.begin("t2")
    del s  # no close: the file must be consistent after every call
    again = TrajectoryStore(path, "job-a")
    t = again.get("t1")
    assert (t.status, t.rewards, t.turns) == (TrajectoryStatus.REWARDED, (2.0,), (turn,))
    assert [x.id for x in again.list()] == ["t1", "t2"]
    assert [x.id for x in again.list(TrajectoryStatus.IN_PROGRESS)] == ["t2"]
    again.complete("t1", "ready", client_token="c")  # the token is durable too


def test_jobs_are_separated(store):
    other = store.for_job("job-b")
    store.begin("same-id")
    store.append_turn("same-id", make_turn())
    assert other.get("same-id") is None
    with pytest.raises(UnknownTrajectory):
        other.complete("same-id", "ready")
    other.begin("same-id")
    other.complete("same-id", "failed")
    assert store.get("same-id").status == TrajectoryStatus.IN_PROGRESS
    assert store.stats().trajectories_by_status["in_progress"] == 1
    assert other.stats().trajectories_by_status["failed"] == 1
    assert len(store.list()) == len(other.list()) == 1


def test_safe_from_several_threads(store):
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                store.begin("shared")
                store.append_turn("shared", make_turn())
                store.begin(f"own-{i}")
                store.append_turn(f"own-{i}", make_turn())
                store.get("shared", last_turn_only=True)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    shared = store.get("shared")
    assert [t.index for t in shared.turns] == list(range(160))
    assert store.stats().usage.turns == 320
