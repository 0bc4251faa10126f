"""spawn_process forks tessellm's children from a forkserver that imported torch and tessellm
once (distributed/spawn.py). A forked child gets the caller's environment and standard streams
as they are when it starts (not the forkserver's, from when it started); a caller whose
import state (sys.path, a variable that a module may read at import) changed gets a child of a
forkserver started with the new state; a child
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


def test_a_changed_variable_that_no_import_reads_is_given_to_a_child_of_the_same_forkserver(
        tmp_path, monkeypatch):
    _run(report, str(tmp_path / "before.json"), os.getpid())
    monkeypatch.setenv("CITIME_TEST_OTHER_VAR", "set after the forkserver started")
    monkeypatch.chdir(tmp_path)  # no relative entry on sys.path: the imports do not change
    _run(report, str(tmp_path / "after.json"), os.getpid())
    before, after = (json.loads((tmp_path / n).read_text()) for n in ("before.json", "after.json"))
    assert before["other"] is None and after["other"] == "set after the forkserver started"
    assert after["cwd"] == str(tmp_path)
    assert before["ppid"] == after["ppid"] != os.getpid()  # one forkserver forked both


def test_a_changed_import_state_gets_a_forkserver_started_with_it(tmp_path, monkeypatch):
    """A variable that imports may read, or sys.path, changed since the forkserver started: the
    child is forked by a new forkserver started with the new values (as a spawned child would
    import them) and sees them; the previous forkserver serves a change back; one that is let
    go (the third import state) still sees its running child through to its exit code."""
    from spawn_targets import wait_for_file

    from tessellm.distributed import spawn

    flag = tmp_path / "flag"
    first = spawn_process(wait_for_file, "tessellm-test-child", (str(flag),))  # runs throughout
    _run(report, str(tmp_path / "a.json"), os.getpid())
    extra = tmp_path / "on_sys_path"
    extra.mkdir()
    monkeypatch.syspath_prepend(str(extra))
    monkeypatch.setenv("TRITON_TESSELLM_TEST_MARK", "new")
    started = spawn.counts["forked_new"]
    _run(report, str(tmp_path / "b.json"), os.getpid())
    assert spawn.counts["forked_new"] == started + 1
    monkeypatch.undo()  # back to the first state: its forkserver was kept
    _run(report, str(tmp_path / "c.json"), os.getpid())
    monkeypatch.syspath_prepend(str(extra))  # and to the second: kept too
    monkeypatch.setenv("TRITON_TESSELLM_TEST_MARK", "new")
    _run(report, str(tmp_path / "e.json"), os.getpid())
    monkeypatch.setenv("TRITON_TESSELLM_TEST_MARK", "third")  # the first state's is let go
    _run(report, str(tmp_path / "d.json"), os.getpid())
    monkeypatch.undo()
    assert spawn.counts["forked_new"] == started + 2
    a, b, c, d, e = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "abcde")
    assert b["ppid"] not in (a["ppid"], os.getpid())  # forked, by another forkserver
    assert (b["import_time"], b["parent_import_time"]) == ("new", "new")
    assert b["sys_path"][0] == str(extra) and str(extra) not in a["sys_path"] + c["sys_path"]
    assert (a["import_time"], a["parent_import_time"]) == (None, None)
    assert c["ppid"] == a["ppid"] and c["import_time"] is None
    assert e["ppid"] == b["ppid"] and e["parent_import_time"] == "new"
    assert d["parent_import_time"] == "third" and d["ppid"] not in (a["ppid"], b["ppid"])
    assert a["ppid"] not in [server._forkserver_pid for server in spawn._servers.values()]
    assert first.is_alive()  # its forkserver was let go, not stopped under it
    flag.write_text("go")
    first.join(timeout=120)
    assert first.exitcode == 0 and (tmp_path / "flag.done").exists()


def test_a_forked_childs_own_children_come_from_the_same_forkserver(tmp_path):
    """An engine core's workers: forked by the forkserver that forked the core (no forkserver
    of its own to start), with the core as their parent for ``parent_gone``."""
    from spawn_targets import start_one

    path = tmp_path / "grandchild.json"
    proc = spawn_process(start_one, "tessellm-test-child", (str(path),), daemon=False)
    proc.join(timeout=120)
    assert proc.exitcode == 0
    starter = json.loads((tmp_path / "grandchild.json.starter").read_text())
    grandchild = json.loads(path.read_text())
    assert starter["ppid"] == grandchild["ppid"] != os.getpid()
    assert not grandchild["gone"]  # its caller (the child) was alive when it asked


def test_a_prestarted_forkserver_forks_the_child_started_later(tmp_path, monkeypatch):
    """``prestart`` (``tessellm serve`` calls it first thing): the forkserver starts now, for
    the environment the caller will have by then, which it leaves as it was."""
    from tessellm.distributed import spawn

    monkeypatch.delenv("TRITON_TESSELLM_TEST_MARK", raising=False)
    before = dict(os.environ)
    spawn.prestart({"TRITON_TESSELLM_TEST_MARK": "prestarted"})
    assert dict(os.environ) == before
    monkeypatch.setenv("TRITON_TESSELLM_TEST_MARK", "prestarted")  # as the engine client does
    server = spawn._servers[spawn.import_state(dict(os.environ))]
    _run(report, str(tmp_path / "child.json"), os.getpid())
    child = json.loads((tmp_path / "child.json").read_text())
    assert child["ppid"] == server._forkserver_pid
    assert child["parent_import_time"] == child["import_time"] == "prestarted"
    # One prestarted for a state that never comes is let go when another is started.
    spawn.prestart({"TRITON_TESSELLM_TEST_UNUSED": "never"})
    unused = spawn._servers[spawn.import_state({**os.environ, "TRITON_TESSELLM_TEST_UNUSED": "never"})]
    monkeypatch.setenv("TRITON_TESSELLM_TEST_MARK", "after")
    _run(report, str(tmp_path / "after.json"), os.getpid())
    assert unused not in spawn._servers.values()


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
