"""tests/xdist_scheduling.py (the suite's pytest-xdist scheduling) on a small synthetic suite: a
worker killed while its forked child lives ends the run at once, its test reported failed once,
the rest of its unit run elsewhere."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("xdist")

REPO = Path(__file__).resolve().parents[1]

CONFTEST = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from tests.xdist_scheduling import keep_channel_out_of_forks, make_scheduler

def pytest_xdist_make_scheduler(config, log):
    return make_scheduler(config, log, {{"pair": ("test_pair_",)}})

def pytest_configure(config):
    if hasattr(config, "workerinput"):
        keep_channel_out_of_forks(config)
"""

# test_a2 forks a child that outlives its worker (as an engine core would), then the worker is
# killed (as the OOM killer does).
PAIR_A = """
import multiprocessing, os, time

def _outlive_the_worker(pid_file):
    open(pid_file, "w").write(str(os.getpid()))
    time.sleep(120)

def test_a1():
    pass

def test_a2():
    child = multiprocessing.get_context("fork").Process(
        target=_outlive_the_worker, args=(os.environ["CHILD_PID_FILE"],))
    child.start()
    while not os.path.exists(os.environ["CHILD_PID_FILE"]):
        time.sleep(0.01)
    os.kill(os.getpid(), 9)

def test_a3():
    pass
"""


def test_a_killed_worker_fails_its_test_once_and_the_run_ends(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_pair_a.py").write_text(textwrap.dedent(PAIR_A))
    (suite / "test_pair_b.py").write_text("def test_b1():\n    pass\n")
    (suite / "test_other.py").write_text("def test_c1():\n    pass\n")
    pid_file = tmp_path / "child.pid"
    env = dict(os.environ, CHILD_PID_FILE=str(pid_file), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    log = tmp_path / "out.txt"  # a file, not a pipe: the child holds the worker's stderr open
    try:
        # Before the fix the controller waited for the dead worker until its child exited (120 s).
        with log.open("w") as out_file:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "xdist", "-n", "2",
                 "--dist", "loadfile", "-p", "no:cacheprovider", str(suite)],
                cwd=suite, env=env, stdout=out_file, stderr=subprocess.STDOUT, timeout=60)
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = log.read_text()
    assert run.returncode == 1, out
    # one worker died, once (the crash is named in the failure and, untruncated where CI is
    # set, in the summary line too)
    assert out.count("node down") == 1, out
    assert re.search(r"worker 'gw\d+' crashed while running 'test_pair_a.py::test_a2'", out), out
    assert out.count("FAILED test_pair_a.py::test_a2") == 1, out
    assert "PASSED test_pair_a.py::test_a2" not in out, out  # not run again
    for test in ("test_pair_a.py::test_a1", "test_pair_a.py::test_a3",
                 "test_pair_b.py::test_b1", "test_other.py::test_c1"):
        assert f"PASSED {test}" in out, out
    assert "1 failed, 4 passed" in out, out
