"""Multi-LoRA on the hybrid Mamba models: Bamba (llama's attention and MLP, the MLP under HF's
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
}


def _save(family: str, path: str) -> str:
    from tests.models.variant_parity import save_tiny

    if family == "bamba":
        from tests.models.test_bamba import bamba_config

        return save_tiny(bamba_config(), path)
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
def test_hybrid_lora_tensor_parallel_matches_peft(hybrid_setup):
    """TP=2 (gloo worker processes): Granite 4.0-H's two Mamba groups split over the ranks."""
    model, paths = hybrid_setup("granite-4.0-h")
    names = ["qvo-mamba8", None]
    tokens = {tp: mixed_batch(model, paths, PROMPTS, names, MAX_NEW, device="cpu",
                              num_kv_blocks=64, tensor_parallel_size=tp) for tp in (1, 2)}
    assert tokens[2][1] == tokens[1][1]
    jobs, got = tokens[2]
    want = peft_greedy(model, paths[names[0]], PROMPTS, MAX_NEW)
    assert [t for t, (_, n) in zip(got, jobs) if n == names[0]] == want


def test_lora_refused_for_hybrids_without_a_layout(tmp_path):
    """Qwen3-Next, Nemotron-H, Mamba2 and Falcon-H1 have no LoRA layout yet: refused at start,
    naming the two that take adapters."""
    from types import SimpleNamespace

    from transformers import NemotronHConfig

    from tessellm.models.state_space import check_engine_args

    with pytest.raises(ValueError, match=r"NemotronHForCausalLM .* does not support LoRA yet; "
                                         r"drop enable_lora \(Bamba and Granite 4.0-H"):
        check_engine_args(SimpleNamespace(enable_lora=True),
                          NemotronHConfig(architectures=["NemotronHForCausalLM"]))
