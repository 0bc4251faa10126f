"""Child-process targets of test_spawn_fast.py (importable by name, as spawn_process needs)."""

from __future__ import annotations

import json
import os
import sys
import time

from tessellm.distributed.spawn import parent_gone


def report(path: str, caller_pid: int) -> None:
    """What the child sees: its environment, its parent, and whether its caller is alive; and a
    line on standard output and one on standard error."""
    print(f"child {os.getpid()} says hello on stdout", flush=True)
    print(f"child {os.getpid()} says hello on stderr", file=sys.stderr, flush=True)
    with open(path, "w") as f:
        json.dump({"mark": os.environ.get("TESSELLM_TEST_MARK"),
                   "other": os.environ.get("CITIME_TEST_OTHER_VAR"),
                   "ppid": os.getppid(), "gone": parent_gone(caller_pid)}, f)


def wait_for_caller(path: str, caller_pid: int) -> None:
    """Wait until the caller has exited (as a worker or the engine core does), then say so."""
    deadline = time.monotonic() + 120
    while not parent_gone(caller_pid):
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)
    with open(path, "w") as f:
        f.write("caller gone")


def fail(message: str) -> None:
    raise ValueError(message)
