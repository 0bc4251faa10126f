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
                   "import_time": os.environ.get("TRITON_TESSELLM_TEST_MARK"),
                   "parent_import_time": _parent_environ().get("TRITON_TESSELLM_TEST_MARK"),
                   "sys_path": sys.path, "cwd": os.getcwd(),
                   "ppid": os.getppid(), "gone": parent_gone(caller_pid)}, f)


def _parent_environ() -> dict:
    """The environment the parent process (a forkserver, or the caller) was started with."""
    with open(f"/proc/{os.getppid()}/environ", "rb") as f:
        items = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in items}


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


def wait_for_file(path: str) -> None:
    """Wait (up to 120 s) until ``path`` exists, then write ``path + ".done"``: a child that is
    still running while its caller changes things."""
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.05)
    with open(path + ".done", "w") as f:
        f.write("done")


def start_one(path: str) -> None:
    """A child that starts its own child (as an engine core starts its workers), which reports
    to ``path``; this one writes its parent to ``path + ".starter"``."""
    from tessellm.distributed.spawn import spawn_process

    with open(path + ".starter", "w") as f:
        json.dump({"ppid": os.getppid()}, f)
    proc = spawn_process(report, "tessellm-test-grandchild", (path, os.getpid()))
    proc.join(timeout=120)
    if proc.exitcode != 0:
        raise RuntimeError(f"the grandchild exited with {proc.exitcode}")
