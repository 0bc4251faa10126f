"""The example third-party plugin, installed into this environment with pip, end to end:
discovered through its entry point, listed by `tessellm backends`, passing the conformance suite
(which generates text through it) and serving gpt-oss's attention sinks. Each check runs in a fresh interpreter, as a user would."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from backend_plugins import auto_device

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(code: str, timeout: int = 240) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_example_is_discovered_and_listed(example_plugin):
    out = run_python("from tessellm.backends.report import describe_backends; "
                     "print(describe_backends(verbose=True))")
    row = next(line.split() for line in out.splitlines() if line.startswith("toy "))
    assert row[1:4] == ["toy", "yes", "-10"]
    assert "[tessellm-plugin-example 0.1.0]" in out
    toy = out[out.index("\ntoy: "):]
    assert "attention: toy-online-softmax (ToyAttentionKernel) from plugin 'toy'" in toy
    assert "int8 -> int8-weight-only" in toy
    # priority -10: never chosen automatically (the cpu backend's 0 wins where no GPU is)
    assert f"--device=auto selects: {auto_device()}" in out


@pytest.mark.skipif(importlib.util.find_spec("tessellm.entrypoints.cli") is None,
                    reason="the tessellm CLI (tessellm/entrypoints/cli.py) has not landed yet")
def test_tessellm_backends_cli_lists_the_example(example_plugin):
    out = run_python("import sys; from tessellm.entrypoints.cli import main; "
                     "sys.argv = ['tessellm', 'backends', '--verbose']; main()")
    assert "toy" in out and "toy-online-softmax" in out


def _assert_toy_gives_cpu_tokens(path: str, prompts: str, setup: str = "") -> None:
    """In a fresh interpreter: the model at ``path`` (a Python expression; ``setup`` runs
    first) gives the same greedy tokens for ``prompts`` on the toy backend as on cpu."""
    out = run_python(f"""
from tessellm import LLM
from tessellm.testing.harness import greedy_tokens
{setup}
kw = dict(dtype="float32", num_kv_blocks=32, max_model_len=128, max_num_seqs=4)
prompts = {prompts}
toy = LLM({path}, device="toy", **kw)
assert toy.engine.core.backend.plugin_name == "toy"
cpu = LLM({path}, device="cpu", **kw)
a, b = greedy_tokens(toy, prompts, 6), greedy_tokens(cpu, prompts, 6)
assert a == b, (a, b)
print("OK", a)
""")
    assert out.startswith("OK")


def test_gpt_oss_through_the_example_backend(example_plugin, tmp_path):
    """Attention sinks served by a third-party kernel written against the contract alone
    (``supports_attention_sinks``, forward's ``sinks``): gpt-oss on the toy backend gives the
    cpu backend's tokens (which equal HF's, tests/models/test_gpt_oss.py)."""
    _assert_toy_gives_cpu_tokens(
        "path", "[[5, 6, 7, 8, 9], list(range(10, 30))]",
        setup="from tests.models.test_gpt_oss import save_gpt_oss\n"
              f"path = save_gpt_oss({str(tmp_path / 'gpt-oss')!r})")


def test_example_passes_the_conformance_suite(example_plugin):
    """The whole suite on the toy backend, its generation through the plugin among it
    (conformance/test_generation.py: the tiny random Llama's greedy tokens on toy, through
    prefill, chunked prefill, prefix-cache hits and batched decode, equal the cpu backend's)."""
    proc = subprocess.run([sys.executable, "-m", "tessellm.testing", "--backend", "toy", "-q"],
                          capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
