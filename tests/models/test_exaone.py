"""EXAONE 3.x (``ExaoneForCausalLM``) on tiny random models saved as transformers saves them
(the checkpoint's own names: ``transformer.h.N.attn.attention.out_proj``, ``mlp.c_fc_0``, ...)
with the config's own field names (``num_layers``, ``layer_norm_epsilon``,
``activation_function``); greedy tokens and per-token log-probabilities equal HF transformers'
in float32, under chunked prefill and at tensor_parallel_size=2 (gloo)."""

from __future__ import annotations

import json
import os

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny

_ALIASES = {"num_hidden_layers": "num_layers", "rms_norm_eps": "layer_norm_epsilon",
            "hidden_act": "activation_function"}


def save_exaone(path: str, **overrides) -> str:
    from transformers import ExaoneConfig

    config = ExaoneConfig(**{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                             **overrides})
    save_tiny(config, path)
    file = os.path.join(path, "config.json")
    fields = json.load(open(file))
    fields = {_ALIASES.get(k, k): v for k, v in fields.items()}
    fields["architectures"] = ["ExaoneForCausalLM"]  # as EXAONE's own config.json
    with open(file, "w") as f:
        json.dump(fields, f)
    return path


def test_exaone_checkpoint_names(tmp_path):
    from safetensors import safe_open

    path = save_exaone(str(tmp_path / "exaone"))
    names = set(safe_open(os.path.join(path, "model.safetensors"), "pt").keys())
    assert {"transformer.wte.weight", "transformer.ln_f.weight",
            "transformer.h.0.attn.attention.out_proj.weight",
            "transformer.h.0.mlp.c_fc_0.weight"} <= names


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(num_key_value_heads=1, tie_word_embeddings=True,
          rope_parameters={"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 16}),
     dict(max_num_batched_tokens=8)),
], ids=["exaone-3", "mqa-tied-llama3-rope-chunked"])
def test_exaone_matches_hf(overrides, engine, tmp_path):
    path = save_exaone(str(tmp_path / "exaone"), **overrides)
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): the llama decoder under TP (renames happen before a
# rank takes its slice) is tests/distributed/test_parallel_parity.py's, in the default suite.
@pytest.mark.slow
def test_exaone_tensor_parallel(tmp_path):
    path = save_exaone(str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
