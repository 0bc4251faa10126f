"""Granite 4.0-H (``GraniteMoeHybridForCausalLM``) on tiny random models: Mamba2 layers and
attention layers interleaved, experts beside the shared MLP (or the shared MLP alone, dense),
rotary or no position embedding, Granite's four scalars. Greedy tokens and per-token
log-probabilities equal HF transformers' in float32 for concurrent requests of different
lengths, under chunked prefill (chunk boundaries inside prompts: the Mamba states and the KV
cache both carry over) and under preemption. Nothing is mocked."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.models.test_granite import SCALARS
from tests.models.preemption_parity import assert_parity_under_preemption
from tests.models.variant_parity import TINY, assert_parity, hf_reference, prompts, save_tiny


def granite_hybrid_config(**overrides):
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(**{
        **TINY, **SCALARS, "num_hidden_layers": 4, "intermediate_size": 32,
        "shared_intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2,
        "layer_types": ["mamba", "attention", "mamba", "mamba"], "mamba_n_heads": 8,
        "mamba_d_head": 16, "mamba_n_groups": 2, "mamba_d_state": 16, "mamba_d_conv": 4,
        "mamba_expand": 2, "mamba_chunk_size": 8, "position_embedding_type": "rope",
        **overrides})


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    return save_tiny(granite_hybrid_config(), str(tmp_path_factory.mktemp("granite4h")))


@pytest.mark.parametrize("engine", [dict(), dict(max_num_batched_tokens=8)],
                         ids=["whole-prompts", "chunked-prefill"])
def test_granite_hybrid_matches_hf(hybrid_dir, engine):
    assert_parity(hybrid_dir, prompts((1, 6, 23, 30)), max_new=12, **engine)


def test_granite_hybrid_dense_nope(tmp_path):
    """No experts (the shared MLP is each layer's MLP), no position embedding
    (``position_embedding_type`` "nope": Granite 4.0-H's released setting), tied embeddings, a
    Mamba layer last and first."""
    config = granite_hybrid_config(num_local_experts=0, position_embedding_type="nope",
                                   tie_word_embeddings=True,
                                   layer_types=["mamba", "attention", "attention", "mamba"])
    path = save_tiny(config, str(tmp_path / "dense"))
    assert_parity(path, prompts((7, 19)), max_new=10, max_num_batched_tokens=8)


def test_granite_hybrid_tensor_parallel(hybrid_dir):
    """tensor_parallel_size=2 (gloo): Mamba heads and groups, attention heads and experts split
    over the ranks; the partial sums meet in the norms as in the other families."""
    assert_parity(hybrid_dir, prompts((5, 21)), max_new=8, tensor_parallel_size=2, device="cpu",
                  max_num_batched_tokens=16)


def test_granite_hybrid_preemption(hybrid_dir):
    assert_parity_under_preemption(hybrid_dir)



@pytest.mark.slow
@pytest.mark.interpreted
def test_granite_hybrid_on_emulated_cuda(hybrid_dir):
    """The cuda backend's pieces (Triton attention, fused MoE, the Triton conv1d and state
    update, the scan on the device) under the Triton interpreter, with chunked prefill."""
    prompt_list = prompts((5, 21))
    want, _ = hf_reference(hybrid_dir, prompt_list, 6)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(hybrid_dir, dtype="float32", device="cuda", emulate=True,
             max_num_batched_tokens=8) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_list], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == want


def test_granite_hybrid_layer_types_that_do_not_match_the_weights(hybrid_dir, tmp_path):
    """A config.json whose layer types put attention where the checkpoint has a Mamba layer is
    refused at load naming the tensor and the config (it failed with AttributeError:
    'DecoderLayer' object has no attribute 'mamba')."""
    import json
    import shutil

    path = tmp_path / "edited"
    shutil.copytree(hybrid_dir, path)
    config = json.loads((path / "config.json").read_text())
    kinds = ["attention", "attention", "mamba", "mamba"]
    config.update({k: kinds for k in ("layer_types", "layers_block_type") if k in config})
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'model.layers.0.mamba.\S+' belongs to a Mamba layer, "
                                         r"but the config builds layer 0 as DecoderLayer; its "
                                         r"layer types do not match the weights"):
        LLM(str(path), dtype="float32", device="cpu")

