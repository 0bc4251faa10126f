"""On a CUDA GPU: speculative decoding on the recurrent-state models (Mamba2, Granite 4.0-H,
Qwen3-Next), through the cuda backend's path: the fused Triton verify kernels, one launch per
op over every verify sequence's tokens (``kernels/mamba/verify.py``,
``kernels/gated_delta/verify.py``), verify steps eager beside captured decode graphs, async scheduling on (the GPU default). Greedy tokens in float32
equal those without speculation, with drafts both accepted and rejected (the CPU cases:
test_recurrent_spec.py)."""

from __future__ import annotations

import pytest
import torch

from tests.spec_decode.test_recurrent_spec import (NGRAM, VOCAB, assert_spec_matches_plain,
                                                   generate, save_qwen3_next_with_mtp)
from tests.models.variant_parity import save_tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = dict(device="cuda")


@pytest.fixture(autouse=True)
def _device_graphs_on(monkeypatch):
    monkeypatch.delenv("TESSELLM_RECURRENT_STATE_GRAPHS", raising=False)  # on by default (envs.py)


@pytest.mark.parametrize("family", ["mamba2", "granite4h"])
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_ngram_greedy_equals_plain_on_cuda(tmp_path, family, enforce_eager):
    from tests.models.test_granite_moe_hybrid import granite_hybrid_config
    from tests.models.test_mamba2 import hf_norms_each_group, mamba2_config

    config = (mamba2_config(vocab_size=VOCAB) if family == "mamba2"
              else granite_hybrid_config(vocab_size=VOCAB))
    if not hf_norms_each_group(config):
        config = (mamba2_config(vocab_size=VOCAB, n_groups=1) if family == "mamba2"
                  else granite_hybrid_config(vocab_size=VOCAB, mamba_n_groups=1))
    path = save_tiny(config, str(tmp_path / family))
    assert_spec_matches_plain(path, NGRAM, enforce_eager=enforce_eager, **CUDA)


def test_qwen3_next_ngram_and_mtp_on_cuda(tmp_path, monkeypatch):
    """Qwen3-Next with its decode graphs on (TESSELLM_RECURRENT_STATE_GRAPHS=1): n-gram drafts,
    and MTP drafts of a module that mostly predicts a target whose DeltaNet states matter."""
    monkeypatch.setenv("TESSELLM_RECURRENT_STATE_GRAPHS", "1")
    path = save_qwen3_next_with_mtp(str(tmp_path / "q3n"), predictable=True, state_scale=0.05)
    assert_spec_matches_plain(path, NGRAM, **CUDA)
    want, _ = generate(path, max_tokens=12, **CUDA)
    got, stats = generate(path, {"method": "qwen3_next_mtp", "num_speculative_tokens": 3},
                          max_tokens=12, **CUDA)
    assert got == want
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
