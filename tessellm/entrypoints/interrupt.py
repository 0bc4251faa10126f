"""Ctrl-C (SIGINT) while ``LLM.generate`` steps the engine in this process: taken between two
steps, never inside one.

A ``KeyboardInterrupt`` raised inside a step (in the model's forward, the sampler, the
scheduler's update) leaves the engine half way through it: the steps in flight no longer match
what the runner holds, and the next call fails (``IndexError: pop from an empty deque``). Where
the program goes on after the interrupt (a notebook's interrupt button, a REPL, a script that
catches ``KeyboardInterrupt``), the same ``LLM`` must serve its next call. So, around the steps:

* a SIGINT during a step is noted, and the program's own handler (Python's
  ``default_int_handler``, which raises ``KeyboardInterrupt``; a notebook's; the program's own)
  is called with it once the step ends (``step_ended``); the caller then aborts its requests;
* a second SIGINT before then (a step that hangs) calls that handler at once, as before;
* a program whose SIGINT is ignored (``SIG_IGN``), left to the system (``SIG_DFL``) or handled
  outside Python, and a call outside the main thread (which cannot set a handler and never
  receives ``KeyboardInterrupt``), are left as they are.

The program's handler is put back when the steps end, unless the program replaced it meanwhile.

A command that catches the interrupt and ends with 130 (``tessellm serve``, ``generate``)
returns ``ctrl_c_handled()``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

CTRL_C_EXIT = 130  # the exit status of a program a Ctrl-C ended (128 + SIGINT), as a shell reports it


def ctrl_c_handled() -> int:
    """The exit status of a command that caught a Ctrl-C's ``KeyboardInterrupt``: 130.

    CPython up to 3.13 notes a ``KeyboardInterrupt`` that leaves code run from a string (the
    ``exec`` with which dataclasses, namedtuple and attrs build their methods, at import) as
    unhandled even when a caller catches it later; at exit it then kills the process with SIGINT
    instead of exiting with the status returned (the parent saw -2, not 130, about one run in
    eight when the Ctrl-C came during ``serve``'s imports). Each such run starts by clearing that
    note, so a run that completes forgets it. 3.14 notes only an interrupt left unhandled."""
    exec("pass")  # noqa: S102 - clears the note (above)
    return CTRL_C_EXIT


class SigintBetweenSteps:
    """The SIGINT handler while steps run; ``handler``: the program's (None: not installed)."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.pending: Optional[tuple] = None  # (signum, frame) of a SIGINT during the step

    def __call__(self, signum, frame) -> None:
        if self.pending is None:
            self.pending = (signum, frame)
            return
        self.pending = None  # a second one: the step does not end, interrupt it now
        self.handler(signum, frame)

    def step_ended(self) -> None:
        """Call the program's handler for a SIGINT noted during the step (it may raise)."""
        if self.pending is not None:
            signum, frame = self.pending
            self.pending = None
            self.handler(signum, frame)


@contextlib.contextmanager
def sigint_between_steps() -> Iterator[SigintBetweenSteps]:
    """Steps run within; the caller calls ``step_ended()`` after each (module docstring)."""
    in_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if in_main else None
    if not callable(handler):  # SIG_IGN, SIG_DFL, None, or not the main thread: as it is
        yield SigintBetweenSteps(None)
        return
    deferred = SigintBetweenSteps(handler)
    signal.signal(signal.SIGINT, deferred)
    try:
        yield deferred
    finally:
        if signal.getsignal(signal.SIGINT) is deferred:
            signal.signal(signal.SIGINT, handler)
    deferred.step_ended()  # one after the last step's end (steps that raised: their error goes)
