"""A real server for the server tests: the CLI in a subprocess, real uvicorn on a free loopback
port, a real engine core process, the bundled SmolLM2 model.

Small settings keep memory and time down. ``OMP_NUM_THREADS=1``: on a 2-core machine the engine
core, the API process and the test process share the cores; two OpenMP threads in the core spin
against the others and make every step several times slower.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
import pytest

API_KEY = "sk-tessellm-test"
MODEL = "SmolLM2-135M-Instruct"
# --device cpu: the server tests are CPU tests, on a GPU machine too (tests/conftest.py pins
# "auto" in this process only; the server is a child)
SERVER_ARGS = ["--device", "cpu", "--max-model-len", "1024", "--num-kv-blocks", "512", "--max-num-seqs", "64",
               "--sse-keepalive", "0.2", "--max-body-bytes", "1000000", "--max-n", "4",
               "--max-logprobs", "5"]
START_TIMEOUT_S = 240


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: str
    api_key: str = API_KEY
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_tail(self, n: int = 60) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stats(self) -> dict:
        r = httpx.get(f"{self.url}/debug/stats", headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher() -> list[str]:
    if importlib.util.find_spec("tessellm.entrypoints.cli") is not None:
        return [sys.executable, "-m", "tessellm.entrypoints.cli", "serve"]
    return [sys.executable, "-m", "tessellm.entrypoints.serve", "serve"]


def start_server(extra_args: list[str] = (), env: dict | None = None, api_key_flag: bool = True,
                 kernel_warmup: bool = True) -> Server:
    """``kernel_warmup=False``: ``--no-kernel-warmup`` (``server_factory``'s default)."""
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="tessellm-server-", suffix=".log", delete=False)
    args = [*_launcher(), "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS, *extra_args]
    if not kernel_warmup:
        args.append("--no-kernel-warmup")
    if api_key_flag:
        args += ["--api-key", API_KEY]
    proc_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=proc_env)
    server = Server(proc, port, log.name)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"The server exited with code {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"The server was not ready within {START_TIMEOUT_S}s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    stop_servers([server])


def stop_servers(servers: list[Server]) -> None:
    """SIGTERM to all of them at once (each drains in ~1.5 s), then wait for each."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
        os.unlink(server.log_path)


# The factory's servers (all of the session's), and those kept to the session's end (a
# session fixture's); the others are stopped when the module that started them ends.
_STARTED: list[Server] = []
_SESSION_WIDE: list[Server] = []


@pytest.fixture(scope="session")
def server_factory():
    """Start extra servers (e.g. one a test may break); each is stopped at the end of the
    module that started it (``_stop_the_modules_servers``), or of the session.

    Time, not coverage: they start without the kernel warm-up (``--no-kernel-warmup``; ~2.5 s
    of each start on 2 cores, a 1024-token prefill among its steps) unless asked
    (``kernel_warmup=True``). Serving's default, warm-up on, is the session ``server``'s, which
    most server test files use, and test_ready_after_warmup.py checks /ready waits for it."""
    def start(extra_args=(), env=None, api_key_flag=True, kernel_warmup=False) -> Server:
        srv = start_server(list(extra_args), env, api_key_flag, kernel_warmup)
        _STARTED.append(srv)
        return srv

    yield start
    stop_servers(_STARTED)
    _STARTED.clear()


@pytest.fixture(scope="module", autouse=True)
def _stop_the_modules_servers():
    """Memory, and time: a server holds ~1.9 GB (its API process, forkserver and engine core
    with the bundled model and 512 KV blocks), and a session of them all alive at once
    outgrows a CI machine's memory. A module's own servers stop when it ends."""
    before = list(_STARTED)
    yield
    done = [srv for srv in _STARTED if srv not in before and srv not in _SESSION_WIDE]
    stop_servers(done)
    _STARTED[:] = [srv for srv in _STARTED if srv not in done]


@pytest.fixture(scope="session")
def server():
    srv = start_server()
    yield srv
    stop_server(srv)


# A chat template that shows the request's tools (the bundled model's does not).
TOOLS_TEMPLATE = ("{% if tools %}Tools: {% for t in tools %}{{ t.function.name }} {% endfor %}\n{% endif %}"
                  "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="session")
def tools_server(server_factory, tmp_path_factory):
    """A server for tool use: ``TOOLS_TEMPLATE`` and ``--enable-auto-tool-choice
    --tool-call-parser hermes``. One server for test_auto_tool_choice's hermes case and
    test_vllm_compat's /tokenize with tools (a server start saved: ~8 s on 2 cores)."""
    template = tmp_path_factory.mktemp("tools-template") / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    srv = server_factory(["--chat-template", str(template), "--enable-auto-tool-choice",
                          "--tool-call-parser", "hermes"])
    _SESSION_WIDE.append(srv)
    return srv


@pytest.fixture(scope="session")
def client(server):
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0,
                       timeout=120) as c:
        yield c


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as c:
        yield c
