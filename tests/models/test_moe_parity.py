"""The MoE families (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE): greedy tokens equal
HF transformers' in float32 on tiny random models (8 experts, top-2), through LLM.generate on
the cpu backend, from one safetensors file and from a sharded checkpoint."""

from __future__ import annotations

import json
import os

import pytest
from tessellm import LLM, SamplingParams
from tests.conftest import hf_greedy
from tests.models.tiny_moe import prompts, save_tiny_moe

MAX_NEW = 64
@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-moe")
    made = {}

    def make(arch):
        if arch not in made:
            made[arch] = save_tiny_moe(arch, os.path.join(root, arch))
        return made[arch]

    return make


def _generate(path, **kwargs):
    llm = LLM(path, dtype="float32", **kwargs)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_moe_greedy_matches_hf(moe_dir, arch):
    path = moe_dir(arch)
    assert _generate(path) == hf_greedy(path, prompts(), MAX_NEW)


def test_moe_sharded_checkpoint_loads(tmp_path, moe_dir):
    path = save_tiny_moe("qwen2-moe", str(tmp_path / "sharded"), max_shard_size="100KB")
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    got = _generate(path, max_num_batched_tokens=16)  # chunked prefill too
    assert got == _generate(moe_dir("qwen2-moe"))


def test_moe_rejects_bad_top_k():
    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.layers.moe import FusedMoE

    with pytest.raises(ValueError, match="num_experts_per_tok"):
        FusedMoE(4, 64, 32, top_k=5, ops=ReferenceOps())
