"""The conformance suite on a machine without an optional package: a declared quantization
scheme whose package (``quantization.SCHEME_PACKAGES``: gguf) cannot be imported is skipped
with a reason naming the package, and the suite passes (a GPU image without ``gguf`` failed
two cases with ``quantization='gguf' needs the 'gguf' package``). The package's absence is
simulated by a ``gguf`` on the path whose import fails, as a missing one's does."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quant_cases_skip_a_scheme_whose_package_is_missing(tmp_path):
    shadow = tmp_path / "gguf"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'gguf' (simulated)\", name='gguf')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(
        [sys.executable, "-m", "tessellm.testing", "--backend", "cpu", "-q", "-rs",
         "-k", "test_declared_schemes or test_apply_silu_and_mul"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "failed" not in proc.stdout
    assert "2 skipped" in proc.stdout, out[-4000:]
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("'gguf' (needs the 'gguf' package)" in line for line in skips), skips
