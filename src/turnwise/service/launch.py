"""`python -m turnwise.service.launch EXIT_FILE -- COMMAND...`: run a job's command, record its exit.

The executors start a job through this wrapper so that its exit code outlives the service: a
restarted service finds the job either running (by pid) or finished with its code in EXIT_FILE.
SIGTERM and SIGINT are passed on to the command (a training job checkpoints, then exits).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m turnwise.service.launch EXIT_FILE -- COMMAND...", file=sys.stderr)
        return 2
    exit_file = Path(argv[0])
    child = subprocess.Popen(argv[2:])

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    tmp = exit_file.with_suffix(".tmp")
    tmp.write_text(str(code))
    os.replace(tmp, exit_file)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
