"""Bad input on the command line is one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from turnwise.cli import main

ROOT = Path(__file__).parent.parent
DEMO = str(ROOT / "examples" / "support_desk" / "config.yaml")


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("override,expected", [
    ("loss_fn=ppoo", "loss_fn: unknown name 'ppoo'; did you mean 'ppo'?"),
    ("advantage_method=grpo", "advantage_method: unknown name 'grpo'"),
    ("runtime.api_keys=[short]", "runtime.api_keys: each API key must be at least 8 characters"),
])
def test_bad_settings_fail_at_config_load(capsys, monkeypatch, override, expected):
    monkeypatch.chdir(ROOT)
    assert expected in one_error_line(capsys, ["train", DEMO, "--set", override])


def test_a_config_file_that_is_not_utf8(capsys, tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    assert "not UTF-8 text" in one_error_line(capsys, ["train", str(bad)])


def test_an_output_dir_that_cannot_be_created(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "a_file").write_text("x")
    line = one_error_line(capsys, ["train", DEMO, "--set", f"output_dir={tmp_path / 'a_file' / 'runs'}"])
    assert "output_dir" in line and "cannot create the run directory" in line


def test_serve_with_a_port_out_of_range_or_in_use(capsys):
    assert "--port 99999" in one_error_line(capsys, ["serve", "--port", "99999"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot serve on 127.0.0.1:{port}" in one_error_line(capsys, ["serve", "--port", str(port)])


def test_worker_with_a_server_that_is_not_a_url(capsys):
    line = main(["worker", "--agent", "examples.support_desk.agent:agent", "--server", "not-a-url"])
    assert line == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["turnwise worker: error: --server 'not-a-url' is not an http(s) URL, e.g. http://127.0.0.1:8000"]
