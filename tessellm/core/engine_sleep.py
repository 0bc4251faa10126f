"""The engine core's sleep mode and weight updates (docs/sleep_mode.md): a mixin of
``EngineCore`` (tessellm/core/engine_core.py), which owns what is used here: ``executor`` (every
rank's worker, ``collective_rpc``), ``kv`` (the block manager: its prefix cache), ``scheduler``,
``dtype``, ``enable_sleep_mode`` and ``asleep`` (tag -> level of what sleeps now). The ranks'
side is ``tessellm/core/runner_sleep.py``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch


class EngineSleep:
    """``sleep`` / ``wake_up`` / ``load_weights`` over every rank, refused while requests run."""

    def sleep(self, level: int = 1) -> dict:
        """Free the device memory of the weights (level 1: offloaded to host memory; level 2:
        discarded, for new weights) and of the KV cache, on every rank. The prefix cache is
        emptied (its blocks' contents go). Returns the bytes freed per kind (summed over ranks)."""
        from tessellm.core.runner_sleep import TAGS

        self._check_idle("sleep", needs_sleep_mode=True)
        if level not in (1, 2):
            raise ValueError(f"Sleep level must be 1 (offload the weights to host memory) or 2 "
                             f"(discard them), got {level!r}.")
        reports = self.executor.collective_rpc("sleep", level)
        self.kv.reset_prefix_cache()
        for tag in TAGS:
            self.asleep.setdefault(tag, level)
        return {key: sum(r[key] for r in reports) for key in reports[0]}

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Bring back the weights and/or the KV cache (``tags``; None: both). Captured graphs
        are captured again once both are back."""
        from tessellm.core.runner_sleep import TAGS

        tags = list(TAGS) if tags is None else [tags] if isinstance(tags, str) else list(tags)
        unknown = [t for t in tags if t not in TAGS]
        if unknown:
            raise ValueError(f"Unknown wake_up tag(s) {unknown}; use 'weights' and/or 'kv_cache'.")
        if not self.asleep:
            return
        self.executor.collective_rpc("wake_up", tags)
        for tag in tags:
            self.asleep.pop(tag, None)

    def is_sleeping(self) -> bool:
        return bool(self.asleep)

    def sleep_level(self) -> int:
        """0 when awake, else the level of the sleep that some part is still in (the
        ``engine_sleep_state`` metric)."""
        return max(self.asleep.values(), default=0)

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Empty the prefix cache; False while requests hold blocks (nothing is done then).
        ``reset_running_requests`` (vLLM's): the running requests are preempted first (their
        blocks freed; each is recomputed from its tokens when next scheduled, its output
        unchanged), so the cache can be emptied under load."""
        if reset_running_requests:
            self.scheduler.preempt_running()
        return self.kv.reset_prefix_cache()

    def load_weights(self, weights=None, path: Optional[str] = None) -> int:
        """Copy new weights into the model on every rank, in place: ``weights`` an iterable of
        HF-named ``(name, tensor)`` (full tensors) or ``path`` a directory of safetensors. The
        prefix cache is emptied (its KV came from the old weights). Returns how many of the
        model's weights were filled."""
        from tessellm.core.runner_sleep import EngineAsleepError

        self._check_idle("load_weights")
        if self.scheduler.connector is not None:
            raise ValueError("load_weights would change the weights while a KV connector "
                             "(kv_transfer_config) shares KV computed with the current ones; "
                             "start an engine on the new weights instead.")
        if self.asleep.get("weights"):
            raise EngineAsleepError("The weights are asleep; call wake_up(tags=['weights']) before "
                                    "load_weights (the KV cache may stay asleep until generation).")
        if (weights is None) == (path is None):
            raise ValueError("load_weights takes one of weights (an iterable of (name, tensor)) "
                             "or path (a directory of .safetensors files).")
        if path is not None:
            _check_checkpoint(path)
            loaded = self.executor.collective_rpc("load_weights_from_path", path)[0]
        else:
            loaded = _load_weights_on_ranks(self.executor, weights, self.dtype)
        if not loaded:
            raise ValueError("None of the given tensors names a weight of this model; use the "
                             "checkpoint's (Hugging Face) names, e.g. 'model.layers.0.mlp.up_proj.weight'.")
        self.kv.reset_prefix_cache()
        return loaded

    def load_weights_from_path(self, path: str) -> int:
        """``load_weights(path=path)`` (the server's dev route)."""
        return self.load_weights(path=path)

    def save_sharded_state(self, path: str, pattern: Optional[str] = None,
                           max_size: Optional[int] = None) -> list[str]:
        """vLLM's ``engine_core.save_sharded_state``: every rank writes its loaded weights under
        ``path`` (``model-rank-{rank}-part-{part}.safetensors``, or ``pattern``; ``max_size``
        bytes a file at most), for a later ``load_format="sharded_state"`` start with the same
        parallel layout (``loader/sharded_state.py``). Returns the files written, rank by rank.
        The model's other files (config.json, tokenizer) are the caller's to copy there."""
        from tessellm.core.runner_sleep import EngineAsleepError

        if self.asleep.get("weights"):
            raise EngineAsleepError("The weights are asleep; call wake_up(tags=['weights']) before "
                                    "save_sharded_state.")
        return self.executor.save_sharded_state(path, pattern, max_size)

    def _check_idle(self, what: str, needs_sleep_mode: bool = False) -> None:
        if needs_sleep_mode and not self.enable_sleep_mode:
            raise ValueError(f"{what} needs sleep mode; start the engine with enable_sleep_mode=True "
                             "(--enable-sleep-mode).")
        if self.scheduler.has_unfinished() or self.in_flight:  # (a connector's saves: waited for)
            raise ValueError(f"{what}: {len(self.scheduler.requests)} request(s) are still running; "
                             "call it once they finish (or abort them).")


def _check_checkpoint(path: str) -> None:
    """Refused here, before any rank copies a weight (a file that fails half-way would leave
    the model half updated, and an error in a worker would end the engine): no such directory,
    no safetensors files, or a file whose header does not read (not safetensors, truncated)."""
    from safetensors import safe_open

    from tessellm.loader.safetensors_loader import safetensors_files

    try:
        files = safetensors_files(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"load_weights: no safetensors checkpoint at {path!r} ({exc}); "
                         "give a directory holding .safetensors files.") from None
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: the file's fault
            raise ValueError(f"load_weights: {file!r} does not read as safetensors "
                             f"({type(exc).__name__}: {exc}); nothing was loaded.") from None


def _load_weights_on_ranks(executor, weights, dtype: torch.dtype) -> int:
    """In this process: straight into the model. Worker processes: through a safetensors file
    in shared memory that every rank reads its slices of (tensors never cross a socket)."""
    pairs = list(weights.items() if isinstance(weights, dict) else weights)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], torch.Tensor)):
            raise ValueError("load_weights takes (name, torch.Tensor) pairs (or a dict of them), "
                             f"got {type(pair).__name__} {str(pair)[:60]!r}.")
    worker = getattr(executor, "worker", None)
    if worker is not None:
        return worker.load_weights(pairs)
    import shutil
    import tempfile

    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, tensor in pairs:
        host = tensor.detach().to("cpu").contiguous()
        if host.numel() and host.data_ptr() in seen:  # a tied weight given twice: one file entry each
            host = host.clone()
        seen.add(host.data_ptr())
        tensors[name] = host
    del pairs
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="tessellm-weights-", dir=root)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        del tensors
        return executor.collective_rpc("load_weights_from_path", tmp)[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
