"""GGUF files of the qwen3 and starcoder2 architectures, written from tiny random HF models the
way llama.cpp's converter lays them out (``gguf_export.py``: the ``gguf`` package's own HF ->
GGUF tensor names): the config read from the file and every tensor equal the source model's,
and the engine serving the file gives HF transformers' greedy tokens and per-token
log-probabilities (float32, from the source safetensors) under chunked prefill."""

from __future__ import annotations

import os

import pytest
import torch

from tests.models.gguf_export import export_gguf
from tests.models.variant_parity import TINY, hf_reference, ours, prompts, save_tiny


def qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(**{**TINY, "rms_norm_eps": 1e-6, "pad_token_id": 0, "bos_token_id": 1,
                          "eos_token_id": 2})


def starcoder2(**overrides):
    from transformers import Starcoder2Config

    return Starcoder2Config(**{**TINY, "tie_word_embeddings": True, "norm_epsilon": 1e-5,
                               "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                               **overrides})


CASES = {
    "qwen3": (qwen3, {"attention.layer_norm_rms_epsilon": (1e-6, "add_float32")}),
    "starcoder2": (starcoder2, {"attention.layer_norm_epsilon": (1e-5, "add_float32")}),
    "starcoder2-no-bias": (lambda: starcoder2(use_bias=False, tie_word_embeddings=False),
                           {"attention.layer_norm_epsilon": (1e-5, "add_float32")}),
}


def _export(case: str, tmp_path) -> tuple[str, str]:
    make_config, metadata = CASES[case]
    source = save_tiny(make_config(), str(tmp_path / "hf"))
    arch = case.split("-")[0]
    return source, export_gguf(source, str(tmp_path / f"{arch}.gguf"), arch, metadata=metadata)


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_family_config_and_weights_equal_the_source(case, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from tessellm.loader.gguf_loader import iter_gguf_weights, load_gguf_config

    source, path = _export(case, tmp_path)
    want, got = AutoConfig.from_pretrained(source), load_gguf_config(path)
    assert got.architectures == want.architectures
    fields = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
              "norm_epsilon", "use_bias"]
    for field in fields:  # the epsilons are float32 in the file
        assert getattr(got, field, None) == pytest.approx(getattr(want, field, None)), field
    head_size = [getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
                 for c in (got, want)]
    assert head_size[0] == head_size[1]
    theirs = load_file(os.path.join(source, "model.safetensors"))
    weights = dict(iter_gguf_weights(path, torch.float32))
    assert set(weights) == set(theirs)
    for name, tensor in weights.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("case", ["qwen3", "starcoder2"])
def test_gguf_family_serves_like_hf(case, tmp_path):
    source, path = _export(case, tmp_path)
    prompt_list = prompts((5, 30))
    want_tokens, want_lp = hf_reference(source, prompt_list, 16)
    got_tokens, got_lp = ours(path, prompt_list, 16, max_num_batched_tokens=8)
    assert got_tokens == want_tokens
    for got, want in zip(got_lp, want_lp):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
