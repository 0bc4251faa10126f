"""Quantizing on load (``quantization="int8"``) the families whose checkpoint names differ from
llama's, or fuse what our layers take in shards (Phi-3's qkv_proj / gate_up_proj, GLM's
gate_up_proj), renamed and cut by ``checkpoint_names`` before the quantized loader routes them:
every projection is quantized, and greedy tokens and per-token log-probabilities equal HF
transformers' running the same model with each projection's weight replaced by its int8
round trip (per output row, ``quantization.packed.quantize_int8``), in float32."""

from __future__ import annotations

import pytest
import torch

from tests.models.test_exaone import save_exaone
from tests.models.test_gpt_bigcode import bigcode_config
from tests.models.test_glm import glm_config
from tests.models.test_gpt_neox import neox_config
from tests.models.test_phi import phi_config
from tests.models.test_starcoder2 import starcoder2_config
from tests.models.variant_parity import hf_reference, ours, prompts, save_tiny

FAMILIES = {
    "gpt_neox": lambda path: save_tiny(neox_config(), path),
    "gpt_bigcode": lambda path: save_tiny(bigcode_config(multi_query=False), path),
    "exaone": save_exaone,
    "phi": lambda path: save_tiny(phi_config(), path),
    "starcoder2": lambda path: save_tiny(starcoder2_config(), path),
    "phi3": lambda path: save_tiny(phi3_config(), path),
    "glm": lambda path: save_tiny(glm_config("glm"), path),
}


def phi3_config():
    from transformers import Phi3Config

    from tests.models.variant_parity import TINY

    return Phi3Config(**{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})


def int8_round_trip(source: str, path: str) -> str:
    """``source`` with every linear layer's weight inside the decoder layers int8 round-tripped
    (the LM head and embeddings stay as they are, as tessellm quantizes them not)."""
    from transformers import AutoModelForCausalLM

    from tessellm.quantization.packed import quantize_int8

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (".h." in name or ".layers." in name):
                module.weight.copy_(quantize_int8(module.weight).dequantize())
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_int8_on_load(family, tmp_path):
    from tessellm import LLM
    from tessellm.quantization.loading import quantized_linears

    source = FAMILIES[family](str(tmp_path / "source"))
    with LLM(source, dtype="float32", quantization="int8") as llm:
        layers = quantized_linears(llm.engine.core.runner.model)
    assert len(layers) == 2 * 4  # per layer: qkv, o_proj, the MLP's two
    reference = int8_round_trip(source, str(tmp_path / "int8"))
    prompt_list = prompts((5, 20))
    want_tokens, want_lp = hf_reference(reference, prompt_list, 8)
    got_tokens, got_lp = ours(source, prompt_list, 8, quantization="int8")
    assert got_tokens == want_tokens
    for got, want in zip(got_lp, want_lp):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)

