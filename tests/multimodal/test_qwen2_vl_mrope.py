"""M-RoPE (``layers/mrotary.py``) rotates q and k as HF's Qwen2-VL does (its rotary embedding
and ``apply_rotary_pos_emb``): over ``[3, T]`` positions through the backend's rotary op and
through the fused-kernel inputs, and over ``[T]`` positions as plain RoPE; and the runner's
positions provider (``multimodal/mrope.py``) gives each step's rows their table rows or
sequence position + delta, ``[T]`` unless the step holds image tokens."""

from __future__ import annotations

import types

import numpy as np
import torch

from tessellm.backends.reference.ops import ReferenceOps
from tessellm.layers.mrotary import MRotaryEmbedding
from tessellm.multimodal.mrope import MRopePositions

HEAD, HEADS, SECTION = 16, 2, [2, 3, 3]


def _hf_rotate(q, positions):
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    config = Qwen2VLTextConfig(hidden_size=HEAD * HEADS, num_attention_heads=HEADS,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": SECTION})
    cos, sin = Qwen2VLRotaryEmbedding(config)(q, positions[:, None, :])  # [3, 1, T] positions
    x = q.view(1, -1, HEADS, HEAD).transpose(1, 2)  # [1, heads, T, head]
    out, _ = apply_rotary_pos_emb(x, x, cos, sin)
    return out.transpose(1, 2).reshape(q.shape)


def test_three_axis_positions_rotate_as_hf():
    torch.manual_seed(0)
    rotary = MRotaryEmbedding(HEAD, 64, 10000.0, {"rope_type": "default"}, ReferenceOps(), SECTION)
    t = 7
    positions = torch.tensor([[0, 1, 2, 2, 2, 2, 5], [0, 1, 2, 2, 3, 3, 5], [0, 1, 2, 3, 2, 3, 5]])
    q = torch.randn(t, HEADS * HEAD)
    want = _hf_rotate(q, positions)
    got, _ = rotary(positions, q.clone(), q.clone())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rows, table = rotary.kernel_inputs(positions)  # what a kernel that fuses rotary is handed
    fused, _ = ReferenceOps().rotary_embedding(rows, q.clone(), q.clone(), table, HEAD)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    flat, _ = rotary(positions[0], q.clone(), q.clone())  # [T]: t = h = w
    torch.testing.assert_close(flat, _hf_rotate(q, positions[0].expand(3, -1)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(flat, want)


def _state(rid, computed, prompt_len, features=()):
    return types.SimpleNamespace(request_id=rid, num_computed_tokens=computed,
                                 num_prompt_tokens=prompt_len, mm_features=list(features))


def test_step_positions_follow_the_table_then_the_delta():
    """A prompt of 3 text tokens, a 2x3 merged image (grid 1x4x6 at merge 2), 2 text tokens:
    delta = (3 + 3) + 2 - 11 = -3."""
    image = types.SimpleNamespace(offset=3, length=6, end=9, grid_thw=[1, 4, 6])
    provider = MRopePositions(2)
    a, b = _state("a", 2, 11, [image]), _state("b", 5, 8)  # b: text only
    seq = np.array([2, 3, 4, 5, 6], dtype=np.int64)  # a computes 2..4; b decodes at 5
    got = provider.positions([a, b], [3, 1], np.concatenate([seq[:3], [5]]), np.array([0, 3, 4]))
    assert got.tolist() == [[2, 3, 3, 5], [2, 3, 3, 5], [2, 3, 4, 5]]
    a.num_computed_tokens = 9  # past the image: sequence position + delta, one row a token
    got = provider.positions([a], [2], np.array([9, 10]), np.array([0, 2]))
    assert got.tolist() == [6, 7]
    a.num_computed_tokens = 11
    assert provider.positions([a], [1], np.array([11]), np.array([0, 1])).tolist() == [8]
    provider.drop(["a", "b"])  # finished or preempted: forgotten
    assert not provider.prompts
