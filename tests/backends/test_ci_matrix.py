"""ci/: every backend has a lane, each lane is complete, and the generated workflow matches."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "ci"))

from lanes import load_lanes  # noqa: E402


def test_every_backend_has_a_lane_and_a_hardware_lane():
    lanes = load_lanes()
    for backend in ("cpu", "cuda", "rocm", "xpu", "tpu"):
        assert any(lane.backend == backend for lane in lanes.values()), backend
    for backend in ("cuda", "rocm", "xpu", "tpu"):
        hw = [lane for lane in lanes.values() if lane.backend == backend and not lane.runs_on_cpu]
        assert hw and all("self-hosted" in lane.runner for lane in hw), backend
    for lane in lanes.values():
        assert lane.command and lane.install and lane.status
        assert "tessellm.testing --backend " + lane.backend in lane.command


def test_generated_workflow_matches_matrix():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "ci", "gen_workflows.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    workflow = yaml.safe_load(open(os.path.join(REPO, ".github", "workflows", "backends.yml")))
    jobs = workflow["jobs"]
    lanes = load_lanes()
    assert set(jobs) == set(lanes)
    assert jobs["rocm"]["runs-on"] == ["self-hosted", "linux", "gpu-amd-mi300"]
    assert "--backend rocm --emulate" in jobs["rocm-interpret"]["steps"][-1]["run"]
    # Hardware lanes wait for a repository variable naming them; hosted lanes always run.
    for name, lane in lanes.items():
        if lane.runs_on_cpu:
            assert "if" not in jobs[name], name
        else:
            assert f"',{name},'" in jobs[name]["if"] and "TESSELLM_SELF_HOSTED_LANES" in jobs[name]["if"]
    assert jobs["cpu-compile"]["env"] == {"TESSELLM_CPU_COMPILE": "1"}


def test_run_lane_lists_lanes_and_rejects_unknown():
    script = os.path.join(REPO, "ci", "run_lane.py")
    out = subprocess.run([sys.executable, script, "--list"], capture_output=True, text=True)
    assert out.returncode == 0 and "rocm-interpret" in out.stdout
    bad = subprocess.run([sys.executable, script, "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown lane(s) nope" in bad.stderr
