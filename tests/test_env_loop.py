"""The OpenAI tool loop against a scripted OpenAI-compatible server on loopback (real SDK client)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from turnwise.env.loop import StopReason, run_tool_loop
from turnwise.env.tools import ToolBox, tool
from turnwise.types import Message


class ScriptedServer:
    """Answers each POST /v1/chat/completions with the next scripted reply; records requests."""

    def __init__(self, replies: list[dict | int]):
        self.replies = list(replies)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"body": body, "headers": {k.lower(): v for k, v in self.headers.items()}})
                reply = outer.replies.pop(0)
                status, payload = (reply, {"error": {"message": "boom"}}) if isinstance(reply, int) else (200, reply)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="test", max_retries=0)


def completion(content: str = "", calls: list[tuple[str, str]] = (), finish: str | None = None) -> dict:
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                                  "function": {"name": n, "arguments": a}} for i, (n, a) in enumerate(calls)]
    return {"id": "cmpl", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": message,
                         "finish_reason": finish or ("tool_calls" if calls else "stop")}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


@tool(state_type=dict)  # the state is a plain dict here: the parameter annotated `dict` gets it
def get_order(order_id: str, state: dict) -> dict:
    """Look up an order.

    Args:
        order_id: Order id.
    """
    state["lookups"] = state.get("lookups", 0) + 1
    return {"id": order_id, "status": "shipped"}


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    servers: list[ScriptedServer] = []

    def make(replies):
        servers.append(ScriptedServer(replies))
        return servers[-1]

    yield make  # type: ignore[misc]
    for s in servers:
        s.httpd.shutdown()


def loop(srv, state=None, **kw):
    async def main():
        async with srv.client() as client:
            return await run_tool_loop(client, "policy", [Message(role="user", content="where is ord_1?")],
                                       ToolBox([get_order]), {} if state is None else state, **kw)
    return asyncio.run(main())


def test_tool_calls_then_final_answer(server):
    srv = server([
        completion(calls=[("get_order", '{"order_id": "ord_1"}'), ("get_order", '{"order_id": 7}')]),
        completion("<final_output>{\"status\": \"shipped\"}</final_output>"),
    ])
    state: dict = {}
    result = loop(srv, state, max_turns=5, inference_params={"temperature": 0.5, "max_tokens": 64, "top_k": 3},
                  extra_headers={"X-Turnwise-Trajectory-Id": "traj-1"})
    assert result.stop_reason is StopReason.FINAL_ANSWER
    assert (result.turns, result.tool_calls, result.tool_errors) == (2, 2, 1)
    assert [m.role for m in result.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert result.messages[2].content == '{"id":"ord_1","status":"shipped"}'
    assert result.messages[2].tool_call_id == "call_0"
    assert result.messages[3].content.startswith("Error: invalid arguments for get_order")
    assert result.messages[1].tool_calls[0].arguments == '{"order_id": "ord_1"}'  # kept verbatim
    assert state == {"lookups": 1}
    assert result.final_text.startswith("<final_output>")
    assert result.metrics() == {"rollout/turns": 2.0, "rollout/tool_calls": 2.0, "rollout/tool_errors": 1.0,
                                "rollout/stop/final_answer": 1.0}
    first, second = (r["body"] for r in srv.requests)
    assert first["tools"][0]["function"]["name"] == "get_order"
    assert (first["temperature"], first["max_tokens"], first["top_k"]) == (0.5, 64, 3)
    assert srv.requests[0]["headers"]["x-turnwise-trajectory-id"] == "traj-1"
    # the second request carries the whole conversation, tool results included
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "tool", "tool"]


def test_max_turns(server):
    srv = server([completion(calls=[("get_order", '{"order_id": "a"}')])] * 2)
    result = loop(srv, max_turns=2)
    assert result.stop_reason is StopReason.MAX_TURNS
    assert (result.turns, result.tool_calls) == (2, 2)
    assert result.messages[-1].role == "tool"


def test_max_tokens_stops_without_running_truncated_calls(server):
    srv = server([completion("partial answ", finish="length")])
    result = loop(srv)
    assert result.stop_reason is StopReason.MAX_TOKENS
    assert result.tool_calls == 0 and result.turns == 1


def test_failed_request_is_an_error_stop_not_an_exception(server):
    srv = server([completion(calls=[("get_order", '{"order_id": "a"}')]), 500])
    result = loop(srv)
    assert result.stop_reason is StopReason.ERROR
    assert "InternalServerError" in (result.error or "")
    assert result.turns == 1 and result.tool_calls == 1


def test_same_replies_same_messages(server):
    script = [completion(calls=[("get_order", '{"order_id": "a"}')]), completion("done")]
    a, b = loop(server(list(script))), loop(server(list(script)))
    assert a.messages == b.messages


@tool(terminal=True)
def transfer_to_human_agents(summary: str) -> str:
    """Transfer the user to a human agent."""
    return "Transfer successful"


def test_a_terminal_tool_ends_the_loop_there(server):
    srv = server([completion(calls=[("get_order", '{"order_id": "a"}'),
                                    ("transfer_to_human_agents", '{"summary": "wants a human"}'),
                                    ("get_order", '{"order_id": "b"}')]),
                  completion("this reply is never requested")])
    state: dict = {}

    async def main():
        async with srv.client() as client:
            return await run_tool_loop(client, "policy", [Message(role="user", content="human please")],
                                       ToolBox([get_order, transfer_to_human_agents]), state, max_turns=5)

    result = asyncio.run(main())
    assert result.stop_reason is StopReason.TERMINAL_TOOL and result.terminal_tool == "transfer_to_human_agents"
    assert (result.turns, result.tool_calls) == (1, 2)  # the call after the transfer never ran
    assert result.messages[-1].content == "Transfer successful" and state == {"lookups": 1}
    assert len(srv.requests) == 1 and result.metrics()["rollout/stop/terminal_tool"] == 1.0
