"""Run one CI lane (or several) by name: ``python ci/run_lane.py LANE... [--skip-install]``.

``--list`` prints the lanes. Exit status: the first failing lane's, else 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lanes import load_lanes  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_lane(lane, skip_install: bool) -> int:
    env = {**os.environ, **lane.env}
    steps = ([] if skip_install else list(lane.install)) + [lane.command]
    for step in steps:
        print(f"[lane {lane.name}] $ {step}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(["bash", "-c", step], cwd=REPO, env=env)
        print(f"[lane {lane.name}] exit {rc} after {time.monotonic() - t0:.0f}s", flush=True)
        if rc:
            return rc
    return 0


def main(argv=None) -> int:
    lanes = load_lanes()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("lanes", nargs="*", help=f"lane names: {', '.join(lanes)}")
    parser.add_argument("--skip-install", action="store_true", help="use the current environment")
    parser.add_argument("--list", action="store_true", help="list the lanes and exit")
    args = parser.parse_args(argv)
    if args.list or not args.lanes:
        for lane in lanes.values():
            print(f"{lane.name:16} {lane.backend:5} cpu={'yes' if lane.runs_on_cpu else 'no ':3} "
                  f"{' '.join(lane.runner):36} {lane.status}")
        return 0
    unknown = [n for n in args.lanes if n not in lanes]
    if unknown:
        parser.error(f"unknown lane(s) {', '.join(unknown)}; known: {', '.join(lanes)}")
    for name in args.lanes:
        rc = run_lane(lanes[name], args.skip_install)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
