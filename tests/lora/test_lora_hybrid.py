"""Multi-LoRA on the hybrid recurrent-state models: Qwen3-Next (gated attention, whose q_proj
rows hold each head's query and gate, and the gated DeltaNet's ``in_proj_qkvz`` / ``in_proj_ba``,
B cut by key head as the checkpoint's weights, and ``out_proj``), Bamba (llama's attention and MLP, the MLP under HF's
``feed_forward`` name) and Granite 4.0-H (attention; experts and the shared MLP take none),
each also on its Mamba layers' ``in_proj`` (B cut into the mixer's five parts ``[z | x | B | C
| dt]``, A shared) and ``out_proj``. Greedy tokens of a mixed batch (some requests without
adapter) equal HF transformers + peft with each adapter applied alone, in float32, for prompts
longer than the Mamba scan's chunk (the adapted in_proj feeds the conv and SSM states); under
tensor parallelism too (each rank its rows of each in_proj part, its columns of out_proj)."""

from __future__ import annotations

import pytest

from tests.lora.adapters import (adapter_models, assert_mixed_batch_matches_peft, mixed_batch,
                                 peft_greedy)
from tests.models.variant_parity import prompts

MAX_NEW = 6
PROMPTS = prompts((5, 29))
SPECS = {
    "bamba": {"all8": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj", "in_proj", "out_proj"], dict(lora_alpha=16)),
              "mamba16": (16, ["in_proj", "out_proj"], dict(lora_alpha=8, use_rslora=True))},
    "granite-4.0-h": {"qvo-mamba8": (8, ["q_proj", "v_proj", "o_proj", "in_proj", "out_proj"],
                                     dict(lora_alpha=16)),
                      "in16": (16, ["k_proj", "in_proj"], dict(lora_alpha=32))},
    # (peft refuses the Mamba out_proj of Nemotron-H)
    "nemotron-h": {"all8": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
                                "in_proj"], dict(lora_alpha=16)),
                   "mamba16": (16, ["in_proj"], dict(lora_alpha=32))},
    "qwen3-next": {"all8": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz",
                                "in_proj_ba", "out_proj"], dict(lora_alpha=16)),
                   "qkvz16": (16, ["q_proj", "in_proj_qkvz"], dict(lora_alpha=8))},
}


def _save(family: str, path: str) -> str:
    from tests.models.variant_parity import save_tiny

    if family == "bamba":
        from tests.models.test_bamba import bamba_config

        return save_tiny(bamba_config(), path)
    if family == "nemotron-h":  # Mamba, attention, relu2 MLP mixers (no MoE layer: its experts
        from tests.models.test_nemotron_h import nemotron_config  # take no LoRA)

        return save_tiny(nemotron_config(layers_block_type=[
            "linear_attention", "full_attention", "mlp", "linear_attention"]), path)
    if family == "qwen3-next":  # two value heads a key head: v and z rows grouped by key head
        from tests.models.test_qwen3_next import qwen3_next_config

        return save_tiny(qwen3_next_config(), path)
    from tests.models.test_granite_moe_hybrid import granite_hybrid_config

    return save_tiny(granite_hybrid_config(), path)


@pytest.fixture(scope="module")
def hybrid_setup(tmp_path_factory):
    return adapter_models(tmp_path_factory, _save, SPECS, seed=5)


@pytest.mark.parametrize("family", list(SPECS))
def test_hybrid_mixed_batch_matches_peft(hybrid_setup, family):
    model, paths = hybrid_setup(family)
    assert_mixed_batch_matches_peft(model, paths, PROMPTS, [None, *SPECS[family]], MAX_NEW,
                                    family)


@pytest.mark.slow
@pytest.mark.parametrize("family,adapter", [("granite-4.0-h", "qvo-mamba8"),
                                            ("qwen3-next", "all8")])
def test_hybrid_lora_tensor_parallel_matches_peft(hybrid_setup, family, adapter):
    """TP=2 (gloo worker processes): Granite 4.0-H's two Mamba groups split over the ranks;
    Qwen3-Next's two DeltaNet key heads (each rank its key head's q, k and value heads' v, z
    rows of B)."""
    model, paths = hybrid_setup(family)
    names = [adapter, None]
    tokens = {tp: mixed_batch(model, paths, PROMPTS, names, MAX_NEW, device="cpu",
                              num_kv_blocks=64, tensor_parallel_size=tp) for tp in (1, 2)}
    assert tokens[2][1] == tokens[1][1]
    jobs, got = tokens[2]
    want = peft_greedy(model, paths[names[0]], PROMPTS, MAX_NEW)
    assert [t for t, (_, n) in zip(got, jobs) if n == names[0]] == want


def test_lora_refused_for_hybrids_without_a_layout(tmp_path):
    """Mamba2 and Falcon-H1 have no LoRA layout yet: refused at start, naming the hybrids that
    take adapters."""
    from types import SimpleNamespace

    from transformers import FalconH1Config

    from tessellm.models.state_space import check_engine_args

    with pytest.raises(ValueError, match=r"FalconH1ForCausalLM .* does not support LoRA yet; "
                                         r"drop enable_lora \(Bamba, Granite 4.0-H, Nemotron-H"):
        check_engine_args(SimpleNamespace(enable_lora=True),
                          FalconH1Config(architectures=["FalconH1ForCausalLM"]))
