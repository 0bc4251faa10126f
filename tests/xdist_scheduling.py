"""The suite's pytest-xdist scheduling (tests/conftest.py): shared units, the longest first, and
what happens when a worker dies. Imports neither torch nor tessellm, so tests/test_xdist_scheduling.py runs it in a
small synthetic suite.

A worker that dies (the OOM killer, a segfault, ``os.kill(pid, 9)``):

- xdist's controller notices the death when the worker's end of its pipe closes. A child
  **forked** by the worker (an engine core, a forkserver, a multiprocessing fork) inherits that
  pipe (fork copies every descriptor, inheritable or not) and keeps it open after the worker
  is gone: the controller then waits for the dead worker for as long as the child lives
  (forever, for a child that waits on its dead parent) while the other worker, with nothing
  left to run, waits for the controller. ``keep_channel_out_of_forks`` points those
  descriptors at /dev/null in every forked child of a worker.
- Its unfinished tests: the one it was running is reported failed (xdist's "worker 'gwN'
  crashed while running ..."), and is not run again (``remove_node`` below: xdist's own would
  hand it to the replacement worker, which a test that crashes each time kills in turn, up to
  ``--max-worker-restart``); the rest of its units go back to the queue, for the other worker or
  the replacement xdist starts.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

import pytest


# Test files that run whole on one worker under pytest-xdist (``--dist loadfile``), one after
# another: unit name -> path prefixes.
# - "ray cluster": the files that start a local Ray cluster (ray.init, or the `serve --ray`
#   launcher). Two clusters at once on a 2-core machine would each claim the cores Ray counts for
#   its actors and placement (the fleets ask for num_cpus=2), and share Ray's session directory.
# - "server": time, not correctness. tests/server/conftest.py's session servers (``server``, the
#   default one most of those files use, and ``tools_server``) start once per worker process that
#   uses them (~10 s each on a busy 2-core machine); on one worker, once.
# - "bundled hf model": the same for ``bundled_hf_model`` (HF's load of the bundled GGUF, ~11 s),
#   the oracle of these two files.
SHARED_UNITS = {
    "ray cluster": ("tests/ray/", "tests/distributed/test_ray_executor.py",
                    "tests/sampling/test_logits_processors_parallel.py"),
    "server": ("tests/server/",),
    "bundled hf model": ("tests/loader/test_gguf_loader.py", "tests/models/test_default_model.py"),
}


def unit_of(nodeid: str, file_scope: str, shared_units: dict[str, tuple[str, ...]]) -> str:
    """The xdist work unit of a test: its ``shared_units`` name, else its file."""
    return next((unit for unit, prefixes in shared_units.items() if nodeid.startswith(prefixes)),
                file_scope)


@dataclass
class UnitSeconds:
    """Measured seconds per unit (setup + call + teardown of its tests), for the LPT order."""
    units: dict[str, float]
    per_test: float  # the suite's mean seconds a test: a unit not measured counts its tests so

    def estimate(self, unit: str, tests: int) -> float:
        return self.units[unit] if unit in self.units else tests * self.per_test


def read_unit_seconds(path: str) -> UnitSeconds | None:
    """``path``'s ``UnitSeconds`` (JSON written by ``python tests/xdist_scheduling.py LOG``); None
    when absent."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    return UnitSeconds(data["units"], data["per_test"])


def unit_seconds_from_log(text: str, shared_units: dict[str, tuple[str, ...]]) -> UnitSeconds:
    """From a pytest ``--durations=0`` report."""
    seconds: Counter = Counter()
    tests: set[str] = set()
    for m in re.finditer(r"^([\d.]+)s (?:setup|call|teardown)\s+(\S+)", text, re.M):
        seconds[unit_of(m[2], m[2].split("::")[0], shared_units)] += float(m[1])
        tests.add(m[2])
    return UnitSeconds({unit: round(s, 1) for unit, s in seconds.most_common()},
                       round(sum(seconds.values()) / max(1, len(tests)), 3))


def make_scheduler(config: pytest.Config, log, shared_units: dict[str, tuple[str, ...]],
                   unit_seconds: UnitSeconds | None = None):
    """``--dist loadfile`` with the files of each ``shared_units`` entry as one unit, and a dead
    worker's running test reported failed once, not run again (module docstring). None (xdist's
    own) for the other modes.

    ``unit_seconds``: the longest unit is handed out first (LPT), so the last ones are short
    and the workers end close together. xdist's own order, most tests first, hands out last
    the files of a few long tests (a conformance run, a plugin's fresh interpreters), and one
    worker may run such a file alone at the end."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedUnitsTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid, super()._split_scope(nodeid), shared_units)

        def _assign_work_unit(self, node) -> None:
            """xdist hands out the first unit of its queue: the longest one, put first."""
            if unit_seconds is not None:
                longest = max(self.workqueue,
                              key=lambda unit: unit_seconds.estimate(unit, len(self.workqueue[unit])))
                self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

        def remove_node(self, node) -> str | None:
            """A node gone: at the end (nothing pending) None; after a crash the test it was
            running (the first not completed; xdist reports it failed), and its other pending
            tests back in the queue."""
            workload = self.assigned_work.pop(node)
            pending = [(unit, nodeid) for unit, tests in workload.items()
                       for nodeid, done in tests.items() if not done]
            if not pending:
                return None
            unit, crashed = pending[0]
            workload[unit][crashed] = True
            self.workqueue.update((unit, tests) for unit, tests in workload.items()
                                  if not all(tests.values()))
            for other in self.assigned_work:
                self._reschedule(other)
            return crashed

    return SharedUnitsTogether(config, log)


def keep_channel_out_of_forks(config: pytest.Config) -> None:
    """In an xdist worker: a child forked from now on has the worker's pipe to the controller
    on /dev/null (module docstring), so the controller sees the worker's death when it dies."""
    interactor = next((p for p in config.pluginmanager.get_plugins()
                       if type(p).__name__ == "WorkerInteractor"), None)
    io = getattr(getattr(getattr(interactor, "channel", None), "gateway", None), "_io", None)
    files = [getattr(io, name, None) for name in ("infile", "outfile")]
    fds = [f.fileno() for f in files if f is not None and hasattr(f, "fileno")]
    if not fds:  # a warning: the suite still runs, and tests/test_xdist_scheduling.py fails
        config.issue_config_time_warning(pytest.PytestConfigWarning(
            "tests/xdist_scheduling.py: this pytest-xdist/execnet does not keep its worker pipe "
            "at channel.gateway._io (infile, outfile), so a killed worker's forked children "
            "may hang the run; update keep_channel_out_of_forks for it"), stacklevel=2)
        return

    def to_devnull() -> None:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in fds:
            os.dup2(null, fd, inheritable=False)
        os.close(null)

    os.register_at_fork(after_in_child=to_devnull)


if __name__ == "__main__":  # python tests/xdist_scheduling.py DURATIONS_LOG > tests/unit_seconds.json
    with open(sys.argv[1]) as f:
        measured = unit_seconds_from_log(f.read(), SHARED_UNITS)
    print(json.dumps({"#": "seconds per xdist unit from a --durations=0 run "
                           "(python tests/xdist_scheduling.py LOG); the longest are handed out first",
                      "per_test": measured.per_test, "units": measured.units}, indent=0))
