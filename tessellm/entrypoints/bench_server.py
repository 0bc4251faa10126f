"""``bench serve --launch``: a fresh ``tessellm serve`` in a subprocess, timed from start to
``/ready``, scraped for its after-ready Triton compilations, then stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlparse

COMPILE_METRIC = "tessellm:triton_compilations_after_ready"


@dataclass
class LaunchedServer:
    proc: subprocess.Popen
    base_url: str
    time_to_ready_s: float = 0.0
    compilations_after_ready: Optional[float] = None
    command: list = field(default_factory=list)

    @classmethod
    def start(cls, args) -> "LaunchedServer":
        from tessellm.entrypoints.engine_args import engine_args_from, engine_flags

        url = urlparse(args.base_url)
        cmd = [sys.executable, "-m", "tessellm.entrypoints.cli", "serve"]
        if args.model:
            cmd.append(args.model)
        cmd += engine_flags(engine_args_from(args, args.model))
        cmd += ["--host", url.hostname or "127.0.0.1", "--port", str(url.port or 8000), "--no-access-log"]
        print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        server = cls(subprocess.Popen(cmd), args.base_url.rstrip("/"), command=cmd)
        server._wait_ready(args.ready_timeout)
        server.time_to_ready_s = round(time.perf_counter() - t0, 2)
        print(f"server ready after {server.time_to_ready_s} s", file=sys.stderr, flush=True)
        return server

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"The launched server exited with code {self.proc.returncode}.")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"The launched server was not ready within {timeout:.0f} s.")

    def scrape_compilations(self) -> Optional[float]:
        import httpx

        try:
            text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith(COMPILE_METRIC):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self) -> dict:
        self.compilations_after_ready = self.scrape_compilations()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return {"exit_code": self.proc.returncode}

    def summary(self) -> dict:
        return {"time_to_ready_s": self.time_to_ready_s,
                "triton_compilations_after_ready": self.compilations_after_ready,
                "command": " ".join(self.command)}
