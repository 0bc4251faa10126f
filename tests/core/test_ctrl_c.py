"""Ctrl-C: a terminal sends SIGINT to its whole foreground process group, the engine core and
worker processes included. They ignore it (``distributed/spawn.py``); the process the user runs
stops them through the normal path. Each case runs in a session of its own (as a terminal's
job), gets SIGINT sent to its process group while KV saves are under way, and must exit within
a bound as a Ctrl-C does, leave no process of the session running, print no traceback from a
child, and leave every KV block file whole (no temporary one).

* ``tessellm serve`` (TP=2: a core and two worker ranks): it drains as on SIGTERM (the streams
  in flight end normally, their core alive), then exits 130.
* ``LLM(...)`` with worker ranks (TP=2) or engine-core processes (DP=2), in a script that does
  not catch the ``KeyboardInterrupt``: the script's own traceback, then its children stopped
  at exit through their shutdown; it dies of SIGINT, as any Python program does.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tessellm.kv_transfer.shared_storage_format import loadable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BS = 4  # tokens per block
PROMPTS, PROMPT_LEN = 8, 240
EXIT_BOUND_S = 60  # from SIGINT to the exit, on a loaded 2-core machine
START_BOUND_S = 240


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 384) for _ in range(PROMPT_LEN)] for _ in range(PROMPTS)]


def _engine_flags(store) -> dict:
    return {"device": "cpu", "dtype": "float32", "block_size": BS, "num_kv_blocks": 1024,
            "max_model_len": 512, "max_num_batched_tokens": 4096, "max_num_seqs": PROMPTS,
            "kv_transfer_config": {"kv_connector": "SharedStorageConnector", "kv_role": "kv_producer",
                                   "kv_connector_extra_config": {"shared_storage_path": str(store)}}}


def _start(argv: list[str], log) -> subprocess.Popen:
    """``argv`` in a new session (its own process group, as a terminal's job)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_a_block_file(store, proc: subprocess.Popen) -> None:
    """Until the first KV block file is written (a step's saves are under way)."""
    deadline = time.monotonic() + START_BOUND_S
    while not any(f.endswith(".kv") for f in _files(store)):
        assert proc.poll() is None and time.monotonic() < deadline, "no KV block file was saved"
        time.sleep(0.05)


def _ctrl_c(proc: subprocess.Popen) -> tuple[int, float]:
    """SIGINT to the whole process group; the exit status and how long the exit took."""
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    return proc.wait(EXIT_BOUND_S), time.monotonic() - t0


def _session_processes(sid: int) -> list[int]:
    """The processes of session ``sid`` still running (not zombies)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # state, ppid, pgrp, session
            found.append(int(entry))
    return found


def _assert_no_process_left(sid: int) -> None:
    """The forkserver exits once its last child has: wait for it, within a bound."""
    deadline = time.monotonic() + 30
    while _session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _session_processes(sid), _session_processes(sid)


def _files(path) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def _assert_saves_whole(store, ranks: int) -> None:
    """Every prompt block saved by every rank, each file whole; no temporary file left."""
    files = _files(store)
    assert not [f for f in files if ".tmp" in os.path.basename(f)], files
    blocks = [f for f in files if f.endswith(".kv")]
    assert len(blocks) >= ranks * PROMPTS * (PROMPT_LEN // BS), len(blocks)
    assert all(loadable(f, None) for f in blocks)


def _log(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


# -- tessellm serve ----------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_argv(model: str, store, port: int) -> list[str]:
    from tessellm.config import EngineArgs
    from tessellm.entrypoints.engine_args import engine_flags

    args = EngineArgs(model=model, tensor_parallel_size=2, **_engine_flags(store))
    return [sys.executable, "-m", "tessellm.entrypoints.cli", "serve", model, "--host", "127.0.0.1",
            "--port", str(port), *engine_flags(args)]


def _wait_ready(url: str, proc: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + START_BOUND_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, _log(log_path)[-3000:]
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server was not ready within {START_BOUND_S}s")


def _stream(url: str, model: str, prompt: list[int], out: dict, first: threading.Event) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": 64, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                first.set()
                if event.get("choices") and event["choices"][0].get("finish_reason"):
                    out["finish_reason"] = event["choices"][0]["finish_reason"]
                out["usage"] = event.get("usage") or out.get("usage")
    finally:
        first.set()


def test_ctrl_c_stops_serve_cleanly(tiny_model_dir, tmp_path):
    """The streams under way when Ctrl-C comes end normally (the drain, with the core alive:
    before, the core died of the interrupt and cut them short), then the server exits 130."""
    model, port = tiny_model_dir("llama"), _free_port()
    url, log_path = f"http://127.0.0.1:{port}", tmp_path / "serve.log"
    store = tmp_path / "kv"
    with open(log_path, "w") as log:
        proc = _start(_serve_argv(model, store, port), log)
    try:
        _wait_ready(url, proc, log_path)
        results = [dict() for _ in range(PROMPTS)]
        firsts = [threading.Event() for _ in range(PROMPTS)]
        threads = [threading.Thread(target=_stream, args=(url, model, p, results[i], firsts[i]))
                   for i, p in enumerate(_prompts())]
        for t in threads:
            t.start()
        assert all(f.wait(START_BOUND_S) for f in firsts)
        status, took = _ctrl_c(proc)
        for t in threads:
            t.join(EXIT_BOUND_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = _log(log_path)
    assert status == 130 and took < EXIT_BOUND_S, (status, took, text[-3000:])
    assert "Traceback" not in text, text[-5000:]
    for res in results:
        assert res["status"] == 200 and res["finish_reason"] == "length", res
        assert res["usage"]["completion_tokens"] == 64, res
    _assert_no_process_left(proc.pid)
    _assert_saves_whole(store, ranks=2)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def test_ctrl_c_while_serve_starts(tiny_model_dir, tmp_path):
    """Ctrl-C once the engine's forkserver runs (importing torch and tessellm for a few
    seconds, or forking the core by then): the forkserver and the children it forks never take
    the interrupt (before, the forkserver printed a KeyboardInterrupt traceback from its
    imports); the server ends as a Ctrl-C, with one line, and leaves no process behind."""
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = _start(_serve_argv(tiny_model_dir("llama"), tmp_path / "kv", _free_port()), log)
    try:
        deadline = time.monotonic() + START_BOUND_S
        while not any(b"forkserver" in _cmdline(pid) for pid in _session_processes(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, _log(log_path)[-3000:]
            time.sleep(0.02)
        status, took = _ctrl_c(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = _log(log_path)
    assert status == 130 and took < EXIT_BOUND_S, (status, took, text[-3000:])
    assert "Traceback" not in text and "interrupted" in text, text[-5000:]
    _assert_no_process_left(proc.pid)


@pytest.mark.parametrize("module", ["tessellm.entrypoints.cli", "tessellm.entrypoints.serve"])
def test_a_ctrl_c_inside_code_run_by_exec_still_exits_130(module, tmp_path):
    """Where the flake above came from: a Ctrl-C during ``serve``'s imports lands, about one time
    in ten, inside the ``exec`` with which dataclasses build their methods; CPython (up to 3.13)
    then noted the interrupt as unhandled although ``main`` caught it, and a program run with
    ``python -m`` was killed with SIGINT at exit (status -2, not 130). Here the interrupt is
    raised there on purpose, in a program run as the test above runs ``serve``."""
    (tmp_path / "interrupted_main.py").write_text(
        f"import sys, {module} as m\n"
        "def interrupted(argv=None):\n"
        "    exec('raise KeyboardInterrupt')\n"
        "m._main = interrupted\n"
        "sys.exit(m.main([]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "interrupted_main"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 130, (done.returncode, done.stderr[-2000:])
    assert done.stderr.strip() == "tessellm: interrupted.", done.stderr[-2000:]


# -- LLM(...) ------------------------------------------------------------------------------------

_SCRIPT = """\
import json, sys
from tessellm import LLM, SamplingParams
llm = LLM({model!r}, **json.loads({flags!r}))
prompts = [{{"prompt_token_ids": p}} for p in json.loads({prompts!r})]
while True:  # generating when the Ctrl-C comes, however fast the machine
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), use_tqdm=False)
"""


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"data_parallel_size": 2}],
                         ids=["tp2", "dp2"])
def test_ctrl_c_stops_an_llm_script_cleanly(tiny_model_dir, tmp_path, parallel):
    """A script that does not catch the interrupt (nor shut the LLM down): the workers (TP=2)
    or engine cores (DP=2) are stopped at its exit through their shutdown, their saves under
    way written; before, the workers died of the interrupt, or of the SIGTERM at exit,
    mid-write."""
    store, log_path = tmp_path / "kv", tmp_path / "llm.log"
    script = _SCRIPT.format(model=tiny_model_dir("llama"), flags=json.dumps({**_engine_flags(store), **parallel}),
                            prompts=json.dumps(_prompts()))
    with open(log_path, "w") as log:
        proc = _start([sys.executable, "-c", script], log)
    try:
        _wait_for_a_block_file(store, proc)
        status, took = _ctrl_c(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = _log(log_path)
    assert status == -signal.SIGINT and took < EXIT_BOUND_S, (status, took, text[-3000:])
    # One traceback: the script's own KeyboardInterrupt; none from a child.
    assert text.count("Traceback") == 1 and "\nKeyboardInterrupt\n" in text, text[-5000:]
    _assert_no_process_left(proc.pid)
    ranks = parallel.get("tensor_parallel_size", 1)
    _assert_saves_whole(store, ranks=ranks)
