"""Workers start from any main: LLM(..., tensor_parallel_size=2) in a top-level script with no
``if __name__ == "__main__":`` guard, and in a script fed on standard input, gives the TP=1
tokens (gloo on the cpu); so does IPython's interactive shell, the one a Jupyter notebook's kernel
runs (cells execute in a ``__main__`` with no file behind it). Before tessellm/distributed/spawn.py, each spawned worker re-ran the
script (bootstrapping RuntimeError) or failed to find it (FileNotFoundError: '<stdin>')."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tessellm import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 7, 7]]
SCRIPT = """
import json
from tessellm import LLM, SamplingParams
llm = LLM({path!r}, device="cpu", num_kv_blocks=64, seed=0, tensor_parallel_size=2)
outs = llm.generate([{{"prompt_token_ids": p}} for p in {prompts!r}],
                    SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outs]))
llm.shutdown()
"""


@pytest.fixture(scope="module")
def model_and_reference(tiny_model_dir):
    path = tiny_model_dir("llama-sharp")
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return path, [o.outputs[0].token_ids for o in outs]


def _tokens(result: subprocess.CompletedProcess) -> list:
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("TOKENS ")]
    assert len(lines) == 1, result.stdout  # the script ran once: no worker re-ran it
    return json.loads(lines[0][len("TOKENS "):])


@pytest.mark.parametrize("how", ["file", "stdin", "ipython"])
def test_tp2_from_a_script_without_main_guard(model_and_reference, tmp_path, how):
    path, expected = model_and_reference
    code = SCRIPT.format(path=path, prompts=PROMPTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if how == "file":
        script = tmp_path / "no_guard.py"
        script.write_text(code)
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                timeout=600, env=env, cwd=tmp_path)
    elif how == "ipython":
        pytest.importorskip("IPython")
        result = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--quick", "--colors=NoColor",
                                 "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    else:
        result = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True,
                                timeout=600, env=env, cwd=tmp_path)
    assert _tokens(result) == expected
