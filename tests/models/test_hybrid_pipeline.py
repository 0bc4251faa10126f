"""Pipeline parallelism for the hybrid recurrent-state models (Granite 4.0-H, Bamba, Qwen3-Next
and Falcon-H1 on the llama decoder; Mamba2 and Nemotron-H on Mamba2's block stack): two stages (gloo, 2 CPU ranks), each building, loading and
keeping the recurrent state of its own layers only (Granite's and Qwen3-Next's second stage
holds no attention layer: Mamba / DeltaNet layers alone). Greedy tokens and per-token
log-probabilities equal HF transformers' in float32, as the single-stage engine's do
(``test_granite_moe_hybrid.py``, ``test_qwen3_next.py``, ``test_bamba.py``), for concurrent
prompts under chunked prefill (the states carry across chunks on each stage)."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import assert_parity, prompts, save_tiny


def _config(family: str):
    if family == "granite-4.0-h":  # stages [mamba, attention] [mamba, mamba]
        from tests.models.test_granite_moe_hybrid import granite_hybrid_config

        return granite_hybrid_config()
    if family == "qwen3-next":  # stages [linear, full] [linear, linear]
        from tests.models.test_qwen3_next import qwen3_next_config

        return qwen3_next_config()
    if family == "nemotron-h":  # stages [mamba, attention] [mlp, moe, mamba]
        from tests.models.test_nemotron_h import nemotron_config

        return nemotron_config()
    if family == "falcon-h1":  # attention and Mamba in every layer, muP multipliers folded
        from tests.models.test_falcon_h1 import falcon_h1_config

        return falcon_h1_config()
    if family == "mamba2":  # tied embeddings: the last stage's LM head loads its own copy
        from tests.models.test_mamba2 import mamba2_config

        return mamba2_config(tie_word_embeddings=True)
    from tests.models.test_bamba import bamba_config  # stages [mamba] [attention, mamba]

    return bamba_config()


@pytest.mark.parametrize("family", [
    "granite-4.0-h", "qwen3-next", "nemotron-h",  # the three stage paths (llama decoder's hybrid
    # layers, Qwen3-Next's own loader, Mamba2's block stack); the rest on them, slow
    *(pytest.param(f, marks=pytest.mark.slow) for f in ("bamba", "mamba2", "falcon-h1"))])
def test_hybrid_two_stages_match_hf(family, tmp_path):
    path = save_tiny(_config(family), str(tmp_path / family))
    assert_parity(path, prompts((5, 23)), max_new=8, pipeline_parallel_size=2, device="cpu",
                  max_num_batched_tokens=16)
