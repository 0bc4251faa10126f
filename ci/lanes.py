"""Reads ci/matrix.yaml: the lanes, validated. Shared by run_lane.py and gen_workflows.py."""

from __future__ import annotations

import os
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
MATRIX = os.path.join(HERE, "matrix.yaml")
FIELDS = ("backend", "runner", "install", "command", "env", "runs_on_cpu", "status")


@dataclass(frozen=True)
class Lane:
    name: str
    backend: str
    runner: tuple[str, ...]
    install: tuple[str, ...]
    command: str
    env: dict
    runs_on_cpu: bool
    status: str


def load_lanes(path: str = MATRIX) -> dict[str, Lane]:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    lanes = {}
    for name, raw in data["lanes"].items():
        missing = [k for k in FIELDS if k not in raw]
        if missing:
            raise ValueError(f"ci/matrix.yaml lane {name!r} lacks {', '.join(missing)}.")
        lanes[name] = Lane(name, raw["backend"], tuple(raw["runner"]), tuple(raw["install"]),
                           raw["command"].strip(), {k: str(v) for k, v in raw["env"].items()},
                           bool(raw["runs_on_cpu"]), raw["status"])
    return lanes
