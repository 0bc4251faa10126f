"""Encoders under tensor parallelism (CPU, gloo, two worker processes): q/k/v heads, the MLP's
columns and the vocabulary split over the ranks (positions and token types whole on each, the
float32 head whole too), and a BERT cross-encoder's scores (its pair's token types included)
equal HF's in float32."""

from __future__ import annotations

import torch

from tessellm import LLM
from tests.pooling.encoder_models import hf_pair_logits, make_encoder

PAIRS = [("what is a cat", "a small feline"), ("the quick brown fox", "jumps over the lazy dog")]


def test_tensor_parallel_cross_encoder_equals_hf(tmp_path):
    path = make_encoder(str(tmp_path), "bert", num_labels=1)
    with LLM(path, device="cpu", num_kv_blocks=64, tensor_parallel_size=2) as llm:
        assert len(llm.engine.core.executor.worker_info) == 2
        scores = torch.tensor([o.outputs.score for o in llm.score([q for q, _ in PAIRS], [d for _, d in PAIRS])])
    torch.testing.assert_close(scores, torch.sigmoid(hf_pair_logits(path, PAIRS)[:, 0]), atol=1e-5, rtol=0)
