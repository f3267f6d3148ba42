"""turnwise.env: build an agent's tools as a simulated environment, never a live system.

An environment is composed, not subclassed: a `ToolBox` of tools (typed functions, explicit
OpenAI schemas, or cassette replays), per-rollout state (`Episode`: temp dir, deterministic
ids and clock, private SQLite copy, JSON data copied per episode or shared copy-on-write with
`SeedData`, state hash), and a reward (`exact_match`, `lenient_match`, `field_accuracy`,
`state_match`, `gold_state_match`, `outputs_in_messages`, or any function). `run_tool_loop` drives the standard
OpenAI tool loop; `run_python` / `run_sql` verify outcomes in a sandbox; `oracle_rollout` and
`null_rollout` are the reference agents `turnwise verify` scores an environment with.
"""

from turnwise.env.data import SeedData
from turnwise.env.episode import Episode, IdGenerator
from turnwise.env.loop import LoopResult, StopReason, run_tool_loop
from turnwise.env.oracle import format_final_output, null_rollout, oracle_rollout
from turnwise.env.replay import Cassette, CassetteMiss, MissPolicy
from turnwise.env.rewards import (
    Reward,
    exact_match,
    extract_final_output,
    field_accuracy,
    gold_hash,
    gold_state_match,
    lenient_match,
    outputs_in_messages,
    score,
    state_match,
    with_success,
)
from turnwise.env.sandbox import SandboxLimits, SandboxResult, SandboxStatus, run_python, run_sql
from turnwise.env.schema import load_schemas, schema_diff
from turnwise.env.tools import EnvironmentFault, Tool, ToolBox, ToolError, ToolResult, serialize_result, tool

__all__ = [
    "Cassette", "CassetteMiss", "EnvironmentFault", "Episode", "IdGenerator", "LoopResult", "MissPolicy",
    "Reward", "SandboxLimits", "SandboxResult", "SandboxStatus", "SeedData", "StopReason", "Tool", "ToolBox", "ToolError",
    "ToolResult", "exact_match", "extract_final_output", "field_accuracy", "format_final_output", "gold_hash", "gold_state_match",
    "lenient_match", "load_schemas", "null_rollout", "oracle_rollout", "outputs_in_messages", "run_python", "run_sql", "run_tool_loop", "schema_diff",
    "score", "serialize_result", "state_match", "tool", "with_success",
]
