"""tests/xdist_scheduling.py (the suite's pytest-xdist scheduling) on a small synthetic suite: a
worker killed while its forked child lives ends the run at once, its test reported failed once,
the rest of its unit run elsewhere; the units measured longest run first."""

from __future__ import annotations

import json
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
import os, sys
sys.path.insert(0, {str(REPO)!r})
from tests.xdist_scheduling import keep_channel_out_of_forks, make_scheduler, read_unit_seconds

def pytest_xdist_make_scheduler(config, log):
    return make_scheduler(config, log, {{"pair": ("test_pair_",)}},
                          read_unit_seconds(os.environ.get("UNIT_SECONDS", "absent.json")))

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


def test_the_longest_units_run_first(tmp_path):
    """One worker, so the order is the hand-out order: by the measured seconds (the pair unit,
    then the file of one long test, then a file not measured, counted at per_test a test), not
    xdist's most-tests-first; a --durations=0 report gives those seconds."""
    from tests.xdist_scheduling import unit_seconds_from_log

    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_pair_a.py").write_text("def test_a1():\n    pass\n")
    (suite / "test_pair_b.py").write_text("def test_b1():\n    pass\n")
    (suite / "test_long.py").write_text("def test_long():\n    pass\n")
    (suite / "test_many.py").write_text("".join(f"def test_m{i}():\n    pass\n" for i in range(6)))
    (suite / "test_new.py").write_text("".join(f"def test_n{i}():\n    pass\n" for i in range(3)))
    report = ("30.00s call     test_pair_a.py::test_a1\n5.00s setup    test_pair_b.py::test_b1\n"
              "20.00s call     test_long.py::test_long\n0.50s call     test_many.py::test_m0\n")
    measured = unit_seconds_from_log(report, {"pair": ("test_pair_",)})
    assert measured.units == {"pair": 35.0, "test_long.py": 20.0, "test_many.py": 0.5}
    assert measured.per_test == 55.5 / 4 and measured.estimate("test_new.py", 3) == 3 * 55.5 / 4
    (tmp_path / "units.json").write_text(json.dumps({"per_test": 1.0, "units": measured.units}))
    env = dict(os.environ, UNIT_SECONDS=str(tmp_path / "units.json"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "xdist", "-n", "1", "--dist", "loadfile",
                          "-p", "no:cacheprovider", str(suite)],
                         cwd=suite, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    ran = [m[1] for m in re.finditer(r"PASSED (test_\w+)\.py", run.stdout)]
    files = [f for i, f in enumerate(ran) if f not in ran[:i]]
    assert files == ["test_pair_a", "test_pair_b", "test_long", "test_new", "test_many"], run.stdout
