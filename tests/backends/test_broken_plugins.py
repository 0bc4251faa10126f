"""Careless plugins (issue 16), installed as a REAL package with entry points
(``pip install --no-deps --target``), each run in a fresh tessellm process that finds them on
PYTHONPATH: wrong layout/shape/dtype caught on the first step naming the plugin; a takeover of
cpu refused unless declared; plugins that fail to load disable only themselves (one warning
line, no traceback, cpu keeps generating); the conformance runner without pytest says what to
install."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import broken_plugins_pkg

from tessellm.backends import spec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KW = 'dtype="float32", num_kv_blocks=32, max_model_len=128, max_num_seqs=4'


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("broken-plugins"))
    target = os.path.join(root, "site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--no-index", "--target", target,
                           broken_plugins_pkg.build(root)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def run(site, plugins, *args, code=None, debug=False):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, REPO]), TESSELLM_PLUGINS=plugins)
    env.pop("TESSELLM_VALIDATE_PLUGINS", None)  # the default: first steps only
    if debug:
        env["TESSELLM_DEBUG"] = "1"
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m",
                                                     "tessellm.entrypoints.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def generate_each(tiny_llama, devices):
    """A script that generates on each device in turn, printing 'device: OK' or the error."""
    return f"""
from tessellm import LLM
from tessellm.testing.harness import greedy_tokens
for device in {devices!r}:
    try:
        greedy_tokens(LLM({tiny_llama!r}, device=device, {KW}), [[1, 2, 3, 4, 5]], 3)
        print(device + ": OK")
    except Exception as exc:
        print(device + ": " + type(exc).__name__ + ": " + str(exc))
"""


def test_wrong_layout_shape_and_dtype_fail_on_the_first_step_naming_the_plugin(site, tiny_llama):
    proc = run(site, "cpu,badlayout,badshape,baddtype,norotary",
               code=generate_each(tiny_llama, ["badlayout", "badshape", "baddtype", "norotary",
                                               "cpu"]))
    out = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    where = "PluginError: Backend plugin '{0}' (tessellm_attention_kernel for backend '{0}'): "
    # same number of elements, silently wrong before: caught by the reference rows
    assert out["badlayout"].startswith(where.format("badlayout") + "forward returned values off "
                                       "by"), proc.stdout + proc.stderr
    assert "laid out [num_tokens, num_heads, head_size]" in out["badlayout"]
    assert out["badshape"] == where.format("badshape") + (
        "forward returned shape (4, 5, 16); expected shape (5, 4, 16) or (5, 64).")
    assert out["baddtype"] == where.format("baddtype") + (
        "forward returned dtype torch.float64; expected dtype torch.float32.")
    # declares fuses_rotary, attends over unrotated q/k: the probe rows are rotated by the
    # reference, so this is caught on the first step too
    assert out["norotary"].startswith(where.format("norotary") + "forward returned values off "
                                      "by"), proc.stdout + proc.stderr
    assert out["cpu"] == "OK"


def test_takeover_of_cpu_is_refused_and_a_declared_override_is_shown(site, tiny_llama):
    proc = run(site, "cpu,takeover", code=generate_each(tiny_llama, ["cpu"]))
    assert ("cpu: PluginError: Backend plugin 'takeover' answered tessellm_attention_kernel for "
            "backend 'cpu', which plugin 'cpu' owns;") in proc.stdout, proc.stdout + proc.stderr
    assert "TESSELLM_OVERRIDES = ('cpu',)" in proc.stdout
    proc = run(site, "cpu,override", "backends", "--verbose")
    assert proc.returncode == 0, proc.stderr
    cpu = proc.stdout[proc.stdout.index("\ncpu: "):]
    assert "overridden by: override (TESSELLM_OVERRIDES)" in cpu
    assert "attention: mine (Mine) from plugin 'override'" in cpu


def test_plugins_that_fail_to_load_leave_the_others_working(site, tiny_llama):
    failures = broken_plugins_pkg.LOAD_FAILURES
    plugins = ",".join(("cpu",) + failures)
    proc = run(site, plugins, "backends")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == len(failures) == len(proc.stderr.splitlines())  # one line each
    for name, line in zip(sorted(failures), sorted(warnings, key=lambda w: w.split("'")[1])):
        assert f"Plugin '{name}' is disabled; the other backends work." in line, line
    assert (f"needs tessellm plugin API 99, but this tessellm provides API "
            f"{spec.TESSELLM_PLUGIN_API}") in proc.stderr
    assert "unknown hook 'tessellm_atention_kernel'" in proc.stderr
    assert "Backend 'cpu' is registered by both 'cpu' and 'dupcpu'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "\ncpu      cpu     yes" in proc.stdout  # tessellm's own cpu, not the duplicate
    gen = run(site, plugins, code=generate_each(tiny_llama, ["cpu"]))
    assert "cpu: OK" in gen.stdout, gen.stdout + gen.stderr


def test_asking_for_a_broken_device_gives_one_sentence_and_a_traceback_only_in_debug(site):
    proc = run(site, "cpu,importerror", "generate", "hi", "--device", "importerror")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("tessellm generate: Device 'importerror' is unavailable because "
                                "its backend plugin 'importerror' failed to load: ")
    assert "No module named 'tessellm_no_such_module'" in lines[-1]
    assert "Traceback" not in proc.stderr
    debug = run(site, "cpu,importerror", "generate", "hi", "--device", "importerror", debug=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_conformance_runner_without_pytest_says_what_to_install():
    code = ("import sys; sys.modules['pytest'] = None\n"
            "from tessellm.testing.__main__ import main\nsys.exit(main([]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 4
    assert 'pip install "tessellm[conformance]"' in proc.stderr and "Traceback" not in proc.stderr
