"""Stepping a bare ``Scheduler`` (plain Python: no model, no torch), as the engine core would:
schedule, then hand back one sampled token (``token``) for each request whose scheduled tokens
reach the end of what it has (a prompt's last chunk, or a decode)."""

from __future__ import annotations


def sampled_tokens(s, out, token: int = 7) -> dict[str, list[int]]:
    """What the model runner would sample for ``out``: ``[token]`` for each request whose
    scheduled tokens end its known tokens; nothing for a prefill chunk that stops short."""
    return {rid: [token] for rid, n in out.num_scheduled_tokens.items()
            if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens}


def run_step(s, token: int = 7):
    """One step of scheduler ``s``: ``(SchedulerOutput, what update returned)``."""
    out = s.schedule()
    return out, s.update(out, sampled_tokens(s, out, token))


def step(s, token: int = 7):
    """One step of scheduler ``s``; its ``SchedulerOutput``."""
    return run_step(s, token)[0]
