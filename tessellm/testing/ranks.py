"""Run a function as several spawned processes (one per rank) and fail with what went wrong:
an exception in a rank (its message), a rank that never finished, or a bad exit."""

from __future__ import annotations

from typing import Callable

import torch.multiprocessing as mp


def _entry(target: Callable, rank: int, args: tuple, errors) -> None:
    try:
        target(rank, *args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then re-raised
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


def run_ranks(target: Callable, world: int, args: tuple = (), timeout_s: float = 300,
              hang_hint: str = "") -> None:
    """``target(rank, *args)`` in ``world`` spawned processes (``target`` importable by
    name); raises AssertionError when a rank raised, hung past ``timeout_s`` or exited badly."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(target, r, args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout_s)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        p.kill()
    assert not hung, f"ranks {hung} never finished{hang_hint}"
    assert errors.empty(), errors.get()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
