"""Llama 4 text (``Llama4ForCausalLM``, and the language model of
``Llama4ForConditionalGeneration``) on tiny random models: interleaved dense / MoE layers (a
shared expert, sigmoid top-k scores scaling the experts' inputs), NoPE layers with attention
temperature tuning, rope layers with interleaved rotary, L2 q/k norm and chunked local
attention. Greedy tokens and per-token log-probabilities equal HF transformers' in float32;
prompts and decoding run across several attention chunks, with several requests at once, under
chunked prefill whose chunks straddle attention-chunk boundaries, and at
tensor_parallel_size=2."""

from __future__ import annotations

import pytest
import torch

from tests.models.variant_parity import (TINY, assert_parity, assert_refused_at_load, ours,
                                         prompts, save_tiny)

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def llama4_config(**overrides):
    from transformers import Llama4TextConfig

    # 4 layers: rope (chunked), rope + MoE, rope (chunked), NoPE + MoE (no_rope_layers default)
    return Llama4TextConfig(**{**TINY, "num_hidden_layers": 4, "head_dim": 16,
                               "intermediate_size": 32, "intermediate_size_mlp": 48,
                               "num_local_experts": 4, "num_experts_per_tok": 1,
                               "interleave_moe_layer_step": 2, "attention_chunk_size": 16,
                               # temperature tuning that changes within the prompts
                               "floor_scale": 4, "attn_scale": 0.5,
                               "max_position_embeddings": 256, **overrides})


LENGTHS = (5, 30, 45, 17)  # with 16 new tokens: across the chunk boundaries at 16, 32 and 48


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(block_size=8)),  # two blocks a chunk: the table shifted by two
    (dict(attention_chunk_size=8, num_experts_per_tok=2, attention_bias=True,
          rope_parameters=LLAMA3), dict(block_size=8, max_num_batched_tokens=7)),
    # Maverick-like: no q/k norm, every layer MoE, no temperature tuning, one KV head
    (dict(use_qk_norm=False, interleave_moe_layer_step=1, attn_temperature_tuning=False,
          num_key_value_heads=1), dict()),
    (dict(attention_chunk_size=None, no_rope_layers=[1, 0, 1, 0]), dict(block_size=4)),
], ids=["scout-like", "chunk8-top2-bias-llama3-prefill7", "maverick-like-mqa", "unchunked"])
def test_llama4_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(llama4_config(**overrides), str(tmp_path / "llama4"))
    assert_parity(path, prompts(LENGTHS), max_new=16, **engine)


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2),
                                      dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_llama4_parallel(parallel, tmp_path):
    """TP: heads, the experts' and the MLPs' intermediate rows split over two ranks (gloo).
    PP: two layers a stage, each a dense chunked-rope layer then a MoE layer (chunked rope on
    the first stage, NoPE on the second)."""
    path = save_tiny(llama4_config(num_experts_per_tok=2), str(tmp_path / "par"))
    assert_parity(path, prompts((5, 40)), max_new=8, device="cpu", block_size=8, **parallel)


def test_chunked_attention_changes_hf_output(tmp_path):
    """The chunk limit matters to the cases above: without it HF's tokens differ."""
    from tests.models.variant_parity import hf_reference

    chunked = save_tiny(llama4_config(), str(tmp_path / "chunked"))
    full = save_tiny(llama4_config(attention_chunk_size=None), str(tmp_path / "full"))
    want = hf_reference(chunked, prompts(LENGTHS), 16)[0]
    assert want != hf_reference(full, prompts(LENGTHS), 16)[0]


def test_llama4_conditional_generation_serves_text(tmp_path):
    """A vision-language checkpoint: its tokens equal HF's ``Llama4ForConditionalGeneration``
    on text prompts (the vision model loads and stays idle; images:
    tests/multimodal/test_llama4*.py)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=128, image_size=28, patch_size=14, vision_output_dim=32,
                  projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5)
    config = Llama4Config(text_config=llama4_config().to_dict(), vision_config=vision)
    torch.manual_seed(0)
    hf = Llama4ForConditionalGeneration(config).eval()
    path = str(tmp_path / "vlm")
    hf.save_pretrained(path)
    prompt_list = prompts((5, 30))
    want = []
    with torch.no_grad():
        for p in prompt_list:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
            want.append(out[0, len(p):].tolist())
    got, _ = ours(path, prompt_list, 12, block_size=8)
    assert got == want
    from PIL import Image

    from tessellm import LLM, SamplingParams

    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with LLM(path, dtype="float32", block_size=8) as llm:  # no processor saved: one clear refusal
        image = Image.new("RGB", (28, 28))
        with pytest.raises(ValueError, match="no usable image processor"):
            llm.generate({"prompt_token_ids": prompt_list[0], "multi_modal_data": {"image": image}},
                         greedy)
        out = llm.generate([{"prompt_token_ids": prompt_list[0]}], greedy, use_tqdm=False)
        assert list(out[0].outputs[0].token_ids) == want[0][:4]  # and it goes on serving


@pytest.mark.parametrize("overrides, match", [
    (dict(attention_chunk_size=12), "block_size 16"),
    (dict(no_rope_layers=[1, 1, 2, 0]), "no_rope_layers"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(layer_types=["chunked_attention", "sliding_attention", "full_attention",
                       "full_attention"]), "layer_types"),
], ids=["chunk-not-block-multiple", "bad-no-rope", "gelu", "bad-layer-type"])
def test_llama4_unsupported_config_refused(overrides, match, tmp_path):
    assert_refused_at_load(llama4_config(**overrides), "Llama4ForCausalLM", tmp_path, match)


def test_llama4_ngram_speculation_across_chunks(tmp_path):
    """Speculative decoding's verify steps put several queries of one sequence in a step; with
    repetitive prompts the n-gram drafts are accepted, and verify steps straddle the chunk
    boundaries (chunk 8): HF's greedy tokens still."""
    from tests.models.variant_parity import hf_reference

    from tessellm import LLM, SamplingParams

    path = save_tiny(llama4_config(attention_chunk_size=8), str(tmp_path / "spec"))
    prompt_list = [[5, 6, 7, 8] * 4 + [9], [10, 11, 12] * 5, [20, 21] * 3]
    want, _ = hf_reference(path, prompt_list, 20)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "prompt_lookup_max": 3}
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    with LLM(path, dtype="float32", block_size=8, speculative_config=spec) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_list], params,
                            use_tqdm=False)
        assert llm.engine.core.scheduler.spec_stats.num_accepted_tokens > 0
    assert [list(o.outputs[0].token_ids) for o in outs] == want


@pytest.mark.slow
@pytest.mark.interpreted
def test_llama4_on_emulated_cuda(tmp_path):
    """The cuda backend's Triton attention (behind the chunk split) and fused MoE (top-2, the
    inputs pre-scaled) under the Triton interpreter, with chunked prefill across a chunk
    boundary (90 s here)."""
    path = save_tiny(llama4_config(attention_chunk_size=8, num_experts_per_tok=2),
                     str(tmp_path / "emulated"))
    assert_parity(path, prompts((13,)), max_new=6, device="cuda", emulate=True,
                  max_num_batched_tokens=8, block_size=8)
