"""``tessellm serve --ray`` as a user runs it, on a real local Ray cluster on this machine.

One launcher (``--num-replicas 2`` and otherwise only what keeps concurrent runs apart: a free
HTTP port, a Ray temp dir and dashboard port of its own) serves the whole module; the tests run
in file order and the last one stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import psutil
import pytest

from ray_fleet import REPO, free_port

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODEL = "SmolLM2-135M-Instruct"
UP_TIMEOUT_S = 420  # Ray with its dashboard + two model loads on 2 shared cores


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)
    return env


def _cli(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tessellm.entrypoints.cli", *argv], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


class Launcher:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="tl-ray-", dir="/tmp")  # short: Ray's socket paths
        self.proc = _cli("serve", "--ray", "--num-replicas", "2", "--port", str(self.port),
                         "--ray-temp-dir", self.temp_dir, "--ray-dashboard-port", "0",
                         start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_up(self) -> None:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the launcher exited:\n{self.log[-3000:]}"
            if "Ray's tools:" in self.log:
                return
            time.sleep(1)
        pytest.fail(f"not up within {UP_TIMEOUT_S}s:\n{self.log[-3000:]}")

    def tool(self, pattern: str) -> str:
        match = re.search(pattern, self.log)
        assert match, self.log[-2000:]
        return match.group(1)

    def ray_processes(self) -> list[psutil.Process]:
        """Processes of this launcher's Ray cluster (whose command line names its temp dir) and
        whatever is left of the launcher's process tree."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in arg for arg in p.info["cmdline"] or []):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def stop(self, tree: list[psutil.Process]) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for p in tree + self.ray_processes():  # the test failed: still leave nothing behind
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def launcher():
    launcher = Launcher()
    tree: list[psutil.Process] = []
    try:
        launcher.wait_up()
        tree.extend(psutil.Process(launcher.proc.pid).children(recursive=True))
        yield launcher
    finally:
        launcher.stop(tree)


def test_two_replicas_with_no_other_flag_come_up_and_answer(launcher):
    assert "2 replica(s) x {CPU: 0.9} + 1 ingress x {CPU: 0.2}" in launcher.log  # fitted to 2 CPUs
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{launcher.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert r.headers["x-tessellm-replica"]
    seen = set()
    for _ in range(40):
        info = httpx.get(f"{launcher.url}/debug/replica", timeout=30)
        assert info.headers["x-tessellm-replica"] == info.json()["replica_id"]
        seen.add(info.json()["replica_id"])
        if len(seen) == 2:
            break
    assert len(seen) == 2


def test_rays_own_tools_see_the_deployment(launcher):
    env = {**_env(), "RAY_AUTH_MODE": "token"}  # the local cluster uses Ray's token auth
    dashboard = launcher.tool(r"serve status -a (\S+)")
    out = subprocess.run(["serve", "status", "-a", dashboard], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"TessellmEngine:\s+status: HEALTHY.*?RUNNING: 2", out.stdout, re.S), out.stdout
    gcs = launcher.tool(r"ray status --address (\S+)")
    out = subprocess.run(["ray", "status", "--address", gcs], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "2.0/2.0 CPU" in out.stdout, out.stdout + out.stderr


def test_joining_with_more_than_the_cluster_has_is_refused_at_once(launcher):
    gcs = launcher.tool(r"ray status --address (\S+)")
    t0 = time.monotonic()
    joined = _cli("serve", "--ray", "--ray-address", gcs, "--num-replicas", "3", "--replica-num-cpus", "1",
                  "--port", str(free_port()))
    out, _ = joined.communicate(timeout=120)
    assert joined.returncode == 2, out
    assert time.monotonic() - t0 < 60  # no model was loaded, nothing waited for Ray to schedule
    assert "The Ray cluster has 0 CPU free, but 3 engine replica(s) x 1 CPU need 3 CPU; lower " \
           "--num-replicas or --replica-num-cpus" in out, out
    # It joined and left: the cluster and its app are untouched.
    assert httpx.get(f"{launcher.url}/ready", timeout=30).status_code == 200


def _stream(url: str, i: int, results: dict, streaming: threading.Event) -> None:
    """One streamed completion; ``streaming`` is set at its first event. ``results[i]``: the
    status, last event and finish reason, or (status, every line) when it is no full stream
    (e.g. a 503 JSON body: the request reached the ingress after the drain began)."""
    body = {"model": MODEL, "prompt": f"Write a long story about a cat named {i}.", "max_tokens": 48,
            "temperature": 0, "stream": True, "ignore_eos": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=180) as r:
            lines, events = [], []
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: "):
                    events.append(line[6:])
                    streaming.set()
        if len(events) < 2:
            results[i] = (r.status_code, lines)
            return
        results[i] = (r.status_code, events[-1], json.loads(events[-2])["choices"][0]["finish_reason"])
    except Exception as exc:  # noqa: BLE001 - recorded, asserted below
        results[i] = repr(exc)
    finally:
        streaming.set()  # ended without an event: the test need not wait for it


def test_sigterm_lets_four_streams_finish_and_leaves_no_ray_process(launcher):
    pid = launcher.proc.pid
    tree = psutil.Process(pid).children(recursive=True)
    assert {"raylet", "gcs_server"} <= {p.name() for p in tree}
    assert launcher.ray_processes()
    results: dict = {}
    streaming = [threading.Event() for _ in range(4)]
    streams = [threading.Thread(target=_stream, args=(launcher.url, i, results, streaming[i]))
               for i in range(4)]
    for t in streams:
        t.start()
    # All four are streaming (each has its first event) before the signal: one still on its way
    # to the ingress when the drain begins is answered 503, as a new request must be.
    for event in streaming:
        assert event.wait(180), f"a stream sent nothing in 180 s: {results}"
    launcher.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # new requests are refused while the four go on
        r = httpx.get(f"{launcher.url}/v1/models", timeout=30)
        if r.status_code == 503:
            break
        time.sleep(0.2)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "server_shutting_down"
    for t in streams:
        t.join(180)
    assert results == {i: (200, "[DONE]", "length") for i in range(4)}, results
    assert launcher.proc.wait(120) == 0, launcher.log[-3000:]
    assert "Drained: no request in flight." in launcher.log
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive and not launcher.ray_processes(), [p.name() for p in alive]
