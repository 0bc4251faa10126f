"""spawn_process forks tessellm's children from a forkserver that imported torch and tessellm
once (distributed/spawn.py). A forked child gets the caller's environment and standard streams
as they are when it starts (not the forkserver's, from when it started); a caller whose
environment changed in a variable that a module may read at import gets a spawned child; a child
sees its caller exit (``parent_gone``; its parent process is the forkserver, so ``os.getppid()``
no longer tells); the forkserver's imports touch no device (its children must initialise CUDA
afresh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from spawn_targets import report

from tessellm.distributed.spawn import spawn_process

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _forkserver_fits_this_process(monkeypatch):
    """The forkserver forks only for the environment, sys.path and cwd it started with; earlier
    tests in the same session may have changed them (the full suite did), which makes every
    later child a plain spawn. These tests are about the forked path, so they take the
    process as it is now as the forkserver's start state, as a fresh process would have it."""
    from tessellm.distributed import spawn

    monkeypatch.setattr(spawn, "_forkserver_key", spawn._key(dict(os.environ)))


def _run(target, *args):
    proc = spawn_process(target, "tessellm-test-child", args)
    proc.join(timeout=120)
    assert proc.exitcode == 0, proc.exitcode
    return proc


def test_a_forked_child_gets_the_callers_environment_and_streams(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TESSELLM_TEST_MARK", "first")
    _run(report, str(tmp_path / "a.json"), os.getpid())
    monkeypatch.setenv("TESSELLM_TEST_MARK", "second")  # tessellm reads its variables when used
    _run(report, str(tmp_path / "b.json"), os.getpid())
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert (a["mark"], b["mark"]) == ("first", "second")
    # Forked, both by the same forkserver: their parent is not this process.
    assert a["ppid"] == b["ppid"] != os.getpid()
    assert not a["gone"] and not b["gone"]
    out, err = capfd.readouterr()  # this test's streams, not those of the forkserver's start
    assert out.count("says hello on stdout") == 2, out
    assert err.count("says hello on stderr") == 2, err


def test_a_changed_variable_that_imports_may_read_gets_a_spawned_child(tmp_path, monkeypatch):
    _run(report, str(tmp_path / "forked.json"), os.getpid())
    monkeypatch.setenv("CITIME_TEST_OTHER_VAR", "set after the forkserver started")
    _run(report, str(tmp_path / "spawned.json"), os.getpid())
    forked, spawned = (json.loads((tmp_path / n).read_text()) for n in ("forked.json", "spawned.json"))
    assert forked["ppid"] != os.getpid() and forked["other"] is None
    assert spawned["ppid"] == os.getpid()  # spawned by this process, with the new value
    assert spawned["other"] == "set after the forkserver started"


def test_an_error_in_a_child_is_reported_by_its_exit_code_and_traceback(capfd):
    from spawn_targets import fail

    proc = spawn_process(fail, "tessellm-test-child", ("the child's own message",))
    proc.join(timeout=120)
    assert proc.exitcode == 1
    err = capfd.readouterr().err
    assert "ValueError: the child's own message" in err, err


def test_a_child_sees_its_caller_exit(tmp_path):
    """The caller (a script) starts a child, then dies without cleaning up (os._exit): the child
    must notice, as a worker notices its engine core is gone, and not wait forever."""
    flag = tmp_path / "flag"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {HERE!r})
        from spawn_targets import wait_for_caller
        from tessellm.distributed.spawn import spawn_process
        spawn_process(wait_for_caller, "tessellm-test-child", ({str(flag)!r}, os.getpid()))
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, cwd=os.getcwd())
    deadline = time.monotonic() + 120
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert flag.exists() and flag.read_text() == "caller gone"


def test_the_forkserver_imports_touch_no_device():
    """Everything the forkserver preloads imports without asking torch about a device: a forked
    child of a process that had initialised CUDA could not use it."""
    script = textwrap.dedent("""
        import importlib
        import torch

        def refuse(*args, **kwargs):
            raise AssertionError("a device was queried at import time")

        for module, name in [(torch.cuda, "is_available"), (torch.cuda, "device_count"),
                             (torch.cuda, "init"), (torch.cuda, "_lazy_init"),
                             (torch._C, "_cuda_getDeviceCount"), (torch.xpu, "is_available"),
                             (torch.xpu, "device_count")]:
            if hasattr(module, name):
                setattr(module, name, refuse)
        from tessellm.distributed.spawn import _PRELOAD
        for name in _PRELOAD:
            importlib.import_module(name)
        assert not torch.cuda.is_initialized()
        print("imported", len(_PRELOAD))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=os.getcwd())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported" in result.stdout
