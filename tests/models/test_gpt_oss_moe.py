"""gpt-oss's MoE block against HF's (``GptOssMLP``) on the same weights: the clamped SwiGLU
(``ExpertActivation("swiglu_oai")``) on HF's interleaved gate/up columns, the router's bias and
softmax over the selected top-k logits, expert biases on both projections; through the cpu
backend's grouped ``fused_moe`` and the reference loop, and with the experts split over two
tensor ranks (the partial sums add up to the whole; the down bias joins once)."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.cpu.ops import CpuOps
from tessellm.backends.reference.moe import ExpertActivation
from tessellm.backends.reference.ops import ReferenceOps
from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.models.gpt_oss import GptOssMoE


def _hf_mlp(seed=0):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=5,
                          num_experts_per_tok=3, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, vocab_size=16, num_hidden_layers=1)
    torch.manual_seed(seed)
    mlp = GptOssMLP(config).float()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.5)
        mlp.experts.gate_up_proj.mul_(4.0)  # some gates and ups past the clamp (7)
    return config, mlp


def _ours(config, mlp, ops, tp=None):
    ctx = ModelContext(ops=ops, make_attention_kernel=None, dtype=torch.float32,
                       device=torch.device("cpu"), tp=tp or TensorParallel())
    moe = GptOssMoE(config, ctx)
    moe.router.weight.data.copy_(mlp.router.weight.data)
    moe.router.bias.data.copy_(mlp.router.bias.data)
    e = mlp.experts
    for part in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
        moe.load(part, getattr(e, part).data)
    return moe


def test_clamped_swiglu_is_hf_apply_gate():
    _, mlp = _hf_mlp()
    x = torch.randn(50, 48) * 6.0  # interleaved [gate0, up0, gate1, up1, ...], past +-7
    want = mlp.experts._apply_gate(x)
    got = ExpertActivation("swiglu_oai", 1.702, 7.0)(torch.cat([x[:, 0::2], x[:, 1::2]], -1))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(ExpertActivation("swiglu_oai", 1.702, 1e9)(
        torch.cat([x[:, 0::2], x[:, 1::2]], -1)), want)  # the clamp matters on these rows


@pytest.mark.parametrize("ops", [CpuOps(), ReferenceOps()], ids=["cpu-grouped", "reference"])
def test_moe_block_matches_hf(ops):
    config, mlp = _hf_mlp()
    x = torch.randn(9, 32)
    want, _ = mlp(x[None])
    got = _ours(config, mlp, ops)(x)
    torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)


class _ConfigOfOlderTransformers:
    """The config as transformers before 5.2x builds it (5.17 on the GPU machine): no
    ``swiglu_limit`` nor ``swiglu_alpha`` attribute (its experts fix 7.0 and 1.702)."""

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name):
        if name in ("swiglu_limit", "swiglu_alpha"):
            raise AttributeError(name)
        return getattr(self._config, name)


def test_moe_block_of_a_config_without_swiglu_limit_matches_hf():
    config, mlp = _hf_mlp()
    # HF's own clamp on this config: the default (transformers 5.17 has no field: 7.0 built in)
    assert float(getattr(config, "swiglu_limit", 7.0)) == 7.0
    x = torch.randn(9, 32)
    want, _ = mlp(x[None])
    got = _ours(_ConfigOfOlderTransformers(config), mlp, CpuOps())(x)
    torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)


def test_moe_block_split_over_two_ranks_sums_to_whole():
    config, mlp = _hf_mlp(seed=1)
    x = torch.randn(7, 32)
    want, _ = mlp(x[None])
    parts = [_ours(config, mlp, CpuOps(), TensorParallel(rank=r, size=2))(x) for r in (0, 1)]
    torch.testing.assert_close(parts[0] + parts[1], want[0], atol=1e-5, rtol=1e-5)


def test_ops_subclass_with_its_own_fused_moe_claims_silu_only():
    """A plugin's ops subclass that replaces fused_moe takes no variant it did not declare
    (the model then runs the reference loop rather than pass it keywords it does not know)."""

    class Mine(ReferenceOps):
        def fused_moe(self, hidden, router_logits, w13, w2, top_k, scoring="softmax",
                      renormalize=True, w13_scale=None, w2_scale=None):
            raise NotImplementedError

    assert Mine.fused_moe_activations == ("silu",)
    config, mlp = _hf_mlp()
    x = torch.randn(3, 32)
    torch.testing.assert_close(_ours(config, mlp, Mine())(x), mlp(x[None])[0][0],
                               atol=1e-5, rtol=1e-5)
