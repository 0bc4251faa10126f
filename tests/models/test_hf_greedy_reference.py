"""The HF greedy reference (tests/conftest.py::hf_greedy) means what ``ignore_eos=True`` means:
EOS may be chosen and does not stop generation. Banning EOS instead (HF's ``min_new_tokens``)
gives different tokens wherever EOS is the greedy choice."""

from __future__ import annotations

import json
import os
import shutil

from tessellm import LLM, SamplingParams
from tests.conftest import hf_greedy

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64]
MAX_NEW = 8


def _greedy(path: str) -> list[int]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    with LLM(path, dtype="float32") as llm:
        out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def _with_eos(src: str, dst: str, eos: int) -> str:
    shutil.copytree(src, dst)
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(dst, name)
        if os.path.exists(path):
            with open(path) as f:
                cfg = json.load(f)
            cfg["eos_token_id"] = eos
            with open(path, "w") as f:
                json.dump(cfg, f)
    return dst


def test_hf_greedy_keeps_eos_when_it_is_the_greedy_choice(tiny_model_dir, tmp_path):
    # Make the model's third greedy token its EOS: our ignore_eos run emits it and goes on.
    eos = _greedy(tiny_model_dir("llama"))[2]
    path = _with_eos(tiny_model_dir("llama"), str(tmp_path / "eos"), eos)
    got = _greedy(path)
    assert eos in got
    assert hf_greedy(path, [PROMPT], MAX_NEW) == [got]
