"""pytest plugin of the device scripts: each test's outcome, one line as it ends, appended to the
file $PYTEST_OUTCOMES (``outcome<TAB>node id<TAB>the error's last "E" line``), so a run cut off
by its time limit still says what passed and what failed. Under pytest-xdist only the
controller writes (it receives every worker's reports). Load it with ``-p pytest_outcomes``
(benchmarks/ on PYTHONPATH); ``python3 benchmarks/pytest_outcomes.py FILE...`` summarises."""

from __future__ import annotations

import os
import sys

_config = None


def pytest_configure(config):
    global _config
    _config = config


def _reason(report) -> str:
    text = getattr(report, "longreprtext", "") or ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E ")]
    last = (errors or lines or [""])[-1]
    return " ".join(last.split())[:240]


def pytest_runtest_logreport(report):
    path = os.environ.get("PYTEST_OUTCOMES")
    if not path or _config is None or hasattr(_config, "workerinput"):
        return
    if report.when == "call":
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xpassed" if report.passed else "xfailed"
    elif report.failed:
        outcome = "error"  # a fixture's setup or teardown
    elif report.when == "setup" and report.skipped:
        outcome = "skipped"
    else:
        return
    reason = _reason(report) if outcome in ("failed", "error", "skipped") else ""
    with open(path, "a") as f:
        f.write(f"{outcome}\t{report.nodeid}\t{reason}\n")


def pytest_collectreport(report):
    """A module that fails to import (often a package this machine lacks): listed apart."""
    path = os.environ.get("PYTEST_OUTCOMES")
    if not path or not report.failed or _config is None or hasattr(_config, "workerinput"):
        return
    with open(path, "a") as f:
        f.write(f"collect_error\t{report.nodeid}\t{_reason(report)}\n")


def summarise(paths: list[str]) -> int:
    """Counts per file and every failure / error with its reason (and, where FILE's .rc sibling
    holds a time limit's exit status, that the part was cut off); 1 if any failed or was cut."""
    bad = 0
    for path in paths:
        counts: dict[str, int] = {}
        failures, uncollected = [], []
        if os.path.exists(path):
            for line in open(path):
                outcome, nodeid, reason = (line.rstrip("\n").split("\t") + ["", ""])[:3]
                counts[outcome] = counts.get(outcome, 0) + 1
                if outcome in ("failed", "error"):
                    failures.append(f"  {outcome.upper()} {nodeid}: {reason}")
                elif outcome == "collect_error":  # shown, not counted: often a missing package
                    uncollected.append(f"  (could not collect {nodeid}: {reason})")
        name = os.path.basename(path).removesuffix(".outcomes")
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test ran"
        rc_path = path.removesuffix(".outcomes") + ".rc"  # the device scripts' exit status
        rc = open(rc_path).read().strip() if os.path.exists(rc_path) else None
        if rc in ("124", "137"):
            summary += f" (rc={rc}: cut off by its time limit; the rest did not run)"
            bad += 1
        elif rc not in (None, "0"):
            summary += f" (rc={rc})"
        print(f"{name}: {summary}")
        print("\n".join(failures + uncollected))
        bad += len(failures)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(summarise(sys.argv[1:]))
