"""DeepSeek-V2 / V2-Lite / V3 (``DeepseekV2ForCausalLM``, ``DeepseekV3ForCausalLM``) on tiny
random models: multi-head latent attention over a latent KV cache (absorbed form,
``models/deepseek_mla.py``) and DeepSeek's grouped MoE routing (``models/moe_routing.py``).
Greedy tokens and per-token log-probabilities equal HF transformers' in float32: V2-Lite (no
q_lora), V2 with q_lora and group-limited routing under chunked prefill, V3's sigmoid routing
with its correction bias, YaRN with mscale_all_dim and non-interleaved rope, prefix-cache hits,
tensor_parallel_size=2 (gloo); the routers against HF's own router modules."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.models.variant_parity import TINY, assert_parity, hf_reference, prompts

MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16)
MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
           n_shared_experts=1, first_k_dense_replace=1)


def deepseek_config(v3: bool = False, **overrides):
    from transformers import DeepseekV2Config, DeepseekV3Config

    cls = DeepseekV3Config if v3 else DeepseekV2Config
    base = {**TINY, **MLA, **MOE, "q_lora_rank": None}
    if v3:  # V3's defaults route 8 experts in 8 groups; these fit 8 experts
        base.update(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    return cls(**{**base, **overrides})


def save_deepseek(config, path: str, seed: int = 0) -> str:
    """A tiny random checkpoint whose norms, biases and V3 correction bias are random too
    (HF starts them at 1 and 0, where they would not matter)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("bias", "e_score_correction_bias")):
                t.uniform_(-0.5, 0.5)
            elif "norm" in name:
                t.add_(torch.rand_like(t) - 0.5)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("v3, overrides, engine", [
    (False, dict(), dict()),
    (False, dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=1,
                 routed_scaling_factor=2.0, attention_bias=True), dict(max_num_batched_tokens=8)),
    (True, dict(q_lora_rank=24), dict()),
    (True, dict(rope_interleave=False, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
        mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1)), dict()),
], ids=["v2-lite", "v2-qlora-grouped-bias-chunked", "v3-qlora", "v3-yarn-noninterleaved"])
def test_deepseek_matches_hf(v3, overrides, engine, tmp_path):
    path = save_deepseek(deepseek_config(v3, **overrides), str(tmp_path / "ds"))
    assert_parity(path, prompts((3, 17, 40)), max_new=12, **engine)


def test_deepseek_prefix_cache_hits(tmp_path):
    """Prompts sharing a 40-token prefix, twice: the second pass reads the first's latent rows
    from the prefix cache (block 16) and gives HF's tokens."""
    path = save_deepseek(deepseek_config(True, q_lora_rank=24), str(tmp_path / "ds"))
    head = prompts((40,), seed=5)[0]
    batch = [head + tail for tail in prompts((3, 9), seed=6)]
    want, _ = hf_reference(path, batch, 8)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with LLM(path, dtype="float32", max_num_batched_tokens=16) as llm:
        for _ in range(2):
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
            assert [list(o.outputs[0].token_ids) for o in outs] == want
        assert llm.engine.core.kv.stats.hits > 0 and all(o.num_cached_tokens >= 32 for o in outs)


def test_deepseek_tensor_parallel(tmp_path):
    path = save_deepseek(deepseek_config(True, q_lora_rank=24), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


@pytest.mark.slow
@pytest.mark.interpreted
@pytest.mark.parametrize("expanded_min_query", [None, 6], ids=["absorbed", "expanded-prefill"])
def test_deepseek_on_emulated_cuda(expanded_min_query, tmp_path, monkeypatch):
    """The cuda backend's own MLA kernels (``kernels/attention/mla.py``: split-KV decode, and
    chunks absorbed or, with the threshold lowered to 6 queries, in the expanded form through
    ``kv_b_proj``), fused experts and ops in the whole model, Triton in the interpreter on host
    tensors: HF's tokens and log-probabilities, chunked prefill and decode."""
    from tessellm.kernels.attention.mla import TritonMLAAttentionKernel

    calls = []
    if expanded_min_query is not None:
        monkeypatch.setattr(TritonMLAAttentionKernel, "expanded_min_query", expanded_min_query)
        expanded = TritonMLAAttentionKernel.forward_expanded

        def counted(self, q, *args):
            calls.append(q.shape[0])
            return expanded(self, q, *args)

        monkeypatch.setattr(TritonMLAAttentionKernel, "forward_expanded", counted)
    path = save_deepseek(deepseek_config(True, q_lora_rank=24), str(tmp_path / "ds"))
    assert_parity(path, prompts((5, 20)), max_new=8, device="cuda", emulate=True,
                  max_num_batched_tokens=8)
    assert bool(calls) == (expanded_min_query is not None)
