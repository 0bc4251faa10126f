"""The torch profiler on every rank of an engine core (vLLM's ``LLM.start_profile`` /
``stop_profile`` and the server's ``POST /start_profile`` / ``/stop_profile``). Mixed into
``EngineCore``; each rank's ``Worker`` runs its own ``torch.profiler``."""

from __future__ import annotations

import os
from typing import Optional

from tessellm import envs


class EngineProfile:
    """Needs ``self.executor``. One profile at a time."""

    def start_profile(self) -> None:
        if getattr(self, "_profiling", False):
            raise ValueError("A profile is already running; call stop_profile() first.")
        self.executor.collective_rpc("start_profile")
        self._profiling = True

    def stop_profile(self, trace_dir: Optional[str] = None) -> list[str]:
        """Each rank's table of the ops that took the most time, in rank order; ``trace_dir``
        (else ``TESSELLM_TORCH_PROFILER_DIR`` / ``VLLM_TORCH_PROFILER_DIR``): a Chrome trace per
        rank there, ``rank{N}.pid{P}.trace.json`` (P: this core's process, so the data-parallel
        cores of a server write apart; none when no directory is given)."""
        if not getattr(self, "_profiling", False):
            raise ValueError("No profile is running; call start_profile() first.")
        trace_dir = trace_dir or envs.torch_profiler_dir()
        path = None
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            # each worker fills in {rank} (str.format): the directory's own braces escaped
            escaped = trace_dir.replace("{", "{{").replace("}", "}}")
            path = os.path.join(escaped, f"rank{{rank}}.pid{os.getpid()}.trace.json")
        self._profiling = False
        return self.executor.collective_rpc("stop_profile", 25, path)
