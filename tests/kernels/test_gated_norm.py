"""The gated RMSNorm of the recurrent mixers: the pure-torch reference
(``backends/reference/gated_norm.py``) against HF's own modules bitwise, and the Triton kernel
(``kernels/gated_norm.py``, the cuda backend's ``FusedOps.gated_rms_norm``) against the
reference (on the GPU where there is one, else through the Triton interpreter), every mode,
float32 / float16 / bfloat16, a weight per channel or shared by the groups, ``z`` a column view
of a wider projection, groups past the kernel's one-tile width, sizes not powers of two."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.gated_norm import GATED_NORM_MODES, gated_rms_norm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-5


def _inputs(rows, channels, weight_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, channels, generator=g).to(dtype)
    wide = torch.randn(rows, channels + 9, generator=g).to(dtype)  # z: a column view of it
    w = (torch.randn(weight_size, generator=g) * 0.5 + 1).to(dtype)
    return y, wide[:, 5:5 + channels], w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_hf_bitwise(dtype):
    """Each mode is what HF's module computes, bit for bit: Mamba2's (Granite 4.0-H, Bamba,
    Nemotron-H share it), Falcon-H1's both ways round, Qwen3-Next's per value head."""
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated
    from transformers.models.mamba2 import modeling_mamba2
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    rows, channels, groups = 5, 48, 2
    y, z, w = _inputs(rows, channels, channels, dtype, 1)
    # the group-wise module (transformers 5.25); older ones (5.17, the GPU image's) normed all
    # groups together, which no released Mamba2 checkpoint's mamba_ssm does: compared where present
    gated = getattr(modeling_mamba2, "Mamba2RMSNormGated", None)
    if gated is not None:
        mamba = gated(channels, channels // groups, eps=EPS).to(dtype)
        mamba.weight.data.copy_(w)
        want = mamba(y, z)
        assert want.dtype == dtype
        assert torch.equal(gated_rms_norm(y, z, w, channels // groups, EPS, "gate_then_norm"), want)
    for before, mode in ((True, "norm_then_gate"), (False, "gate_then_norm_float32")):
        falcon = FalconH1RMSNormGated(channels, eps=EPS, n_groups=groups,
                                      norm_before_gate=before).to(dtype)
        falcon.weight.data.copy_(w)
        got = gated_rms_norm(y, z, w, channels // groups, EPS, mode)
        assert torch.equal(got, falcon(y, z)), mode
    heads, dv = 3, 16
    y, z, w = _inputs(rows, heads * dv, dv, dtype, 2)
    qwen = Qwen3NextRMSNormGated(dv, eps=EPS).to(dtype)
    qwen.weight.data.copy_(w)
    want = qwen(y.reshape(rows, heads, dv), z.reshape(rows, heads, dv)).reshape(rows, -1)
    assert torch.equal(gated_rms_norm(y, z, w, dv, EPS, "norm_round_then_gate"), want)


# float32: reduction order only; float16: a unit in the last place; bfloat16: two (Triton's
# interpreter truncates float32 to bfloat16 where the GPU rounds to nearest)
_TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float16: dict(atol=2e-3, rtol=1e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", GATED_NORM_MODES)
@pytest.mark.parametrize("rows,channels,group_size,shared", [
    (3, 48, 24, False),   # two groups, a weight per channel (Mamba2 with G = 2)
    (4, 40, 40, False),   # one group, not a power of two
    (2, 64, 16, True),    # four value heads sharing one weight (Qwen3-Next)
])
def test_kernel_matches_reference(dtype, mode, rows, channels, group_size, shared):
    from tessellm.kernels.gated_norm import gated_rms_norm as fused

    y, z, w = _inputs(rows, channels, group_size if shared else channels, dtype, rows + channels)
    want = gated_rms_norm(y, z, w, group_size, EPS, mode)
    got = fused(*(t.to(DEVICE) for t in (y, z, w)), group_size, EPS, mode)
    assert got.shape == y.shape and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, **_TOL[dtype])


@pytest.mark.parametrize("mode", ["gate_then_norm", "norm_round_then_gate"])
def test_kernel_tiles_wide_groups(monkeypatch, mode):
    """A group wider than ``MAX_BLOCK`` channels (Mamba2-2.7B's one group of 5120 fits; a
    wider one runs in tiles, two passes): the same result; no rows: an empty output."""
    from tessellm.kernels import gated_norm

    monkeypatch.setattr(gated_norm, "MAX_BLOCK", 16)
    y, z, w = _inputs(3, 2 * 44, 88, torch.float32, 5)
    want = gated_rms_norm(y, z, w, 44, EPS, mode)
    got = gated_norm.gated_rms_norm(*(t.to(DEVICE) for t in (y, z, w)), 44, EPS, mode)
    torch.testing.assert_close(got.cpu(), want, **_TOL[torch.float32])
    empty = gated_norm.gated_rms_norm(y[:0].to(DEVICE), z[:0].to(DEVICE), w.to(DEVICE), 44, EPS,
                                      mode)
    assert empty.shape == (0, 88)


def test_bad_arguments_name_the_problem():
    from tessellm.kernels.gated_norm import MODES
    from tessellm.kernels.gated_norm import gated_rms_norm as fused

    assert MODES == GATED_NORM_MODES  # the kernel module's copy (it imports no backend)

    y, z, w = _inputs(2, 48, 48, torch.float32, 3)
    for fn in (gated_rms_norm, fused):
        with pytest.raises(ValueError, match="mode 'after'"):
            fn(y, z, w, 24, EPS, "after")
        with pytest.raises(ValueError, match="groups of 20 channels"):
            fn(y, z, w, 20, EPS)
        with pytest.raises(ValueError, match=r"weight \(12,\)"):
            fn(y, z, w[:12], 24, EPS)


class _FusedNormOps:
    """The reference ops with the Triton gated norm added (what the cuda backend's ops have),
    so the layers take their fused path on the CPU; ``calls`` counts its launches."""

    def __new__(cls):
        from tessellm.backends.reference.ops import ReferenceOps
        from tessellm.kernels.gated_norm import gated_rms_norm as fused

        calls = []

        def counted(*args, **kwargs):
            calls.append(1)
            return fused(*args, **kwargs)

        ops = type("FusedNormOps", (ReferenceOps,), {"gated_rms_norm": staticmethod(counted)})()
        ops.calls = calls
        return ops


@pytest.mark.parametrize("gate_norm", ["after_gate", "after_gate_float32", "before_gate"])
def test_mixers_take_the_backends_gated_norm(gate_norm):
    """A Mamba2 mixer (each ``gate_norm`` of the families) and a gated DeltaNet layer on ops
    with ``gated_rms_norm`` give the step output of the reference ops (torch's gated norm)."""
    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.core.mamba_state import MambaStateCache, make_batch
    from tessellm.layers.context import ModelContext
    from tessellm.layers.gated_deltanet import DeltaNetShape, GatedDeltaNet
    from tessellm.layers.mamba_mixer import MambaMixer2, MambaShape

    # the Triton kernel takes device tensors where it is compiled (a GPU), host ones interpreted
    cpu = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mamba = MambaShape(hidden_size=32, num_heads=4, head_dim=16, n_groups=2, d_state=8,
                       d_conv=4, chunk_size=8, proj_bias=False, conv_bias=True, eps=1e-5,
                       dt_limit=(0.0, float("inf")), gate_norm=gate_norm)
    delta = DeltaNetShape(hidden_size=32, key_heads=2, value_heads=4, key_dim=8, value_dim=16,
                          conv_width=4, eps=1e-5)
    for make in ((lambda ctx: MambaMixer2(mamba, ctx)),
                 (lambda ctx: GatedDeltaNet(delta, ctx))):
        hidden = torch.randn(1 + 9, 32, generator=torch.Generator().manual_seed(4)).to(cpu)
        outs = []
        for ops in (ReferenceOps(), _FusedNormOps()):
            torch.manual_seed(0)
            layer = make(ModelContext(ops=ops, make_attention_kernel=None, dtype=torch.float32,
                                      device=cpu)).to(cpu)
            with torch.no_grad():
                for p in layer.parameters():
                    p.copy_(torch.randn_like(p) * 0.3)
            cache = MambaStateCache([layer], num_slots=3, device=cpu, dtype=torch.float32)
            cache.step.batch = make_batch([1, 9], [2, 0], cpu)
            with torch.no_grad():
                outs.append(layer(hidden))
        assert ops.calls  # the layer took the backend's gated norm
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def _tp_norm_rank(rank, rdzv, modes):
    """One of two gloo ranks: its half of one group's channels through
    ``mamba_mixer.tp_gated_rms_norm`` against the reference over the whole group."""
    import torch.distributed as dist

    from tessellm.distributed.parallel_state import TensorParallel
    from tessellm.layers.mamba_mixer import tp_gated_rms_norm

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    try:
        tp = TensorParallel(rank, 2, dist.group.WORLD)
        for dtype in (torch.float32, torch.bfloat16):
            y, z, w = _inputs(5, 40, 40, dtype, seed=11)
            mine = slice(rank * 20, rank * 20 + 20)
            for mode in modes:
                want = gated_rms_norm(y, z, w, 40, EPS, mode)[:, mine]
                got = tp_gated_rms_norm(y[:, mine], z[:, mine], w[mine], EPS, mode, tp, 40)
                assert got.dtype == dtype and got.shape == want.shape
                if dtype == torch.float32:  # the sum of squares' order only
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                    continue
                # bfloat16: the reference's rounding points (a missing or extra one moves
                # about a third of the outputs by an ulp); the sum's order may flip a rare one
                off = got != want
                assert off.float().mean() <= 0.02, f"{mode}: {int(off.sum())} of {off.numel()}"
                torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_norm_of_one_group_over_ranks(tmp_path):
    """A mixer with one group (``n_groups == 1``) under tensor parallelism: each rank holds a
    slice of the group's channels and the mean of squares is summed over the ranks
    (``mamba_mixer.tp_gated_rms_norm``, gloo, two processes): each Mamba mode (Mamba2's,
    Falcon-H1's two) as the reference over the whole group, float32 and bfloat16."""
    from tessellm.testing.ranks import run_ranks

    modes = ("gate_then_norm", "gate_then_norm_float32", "norm_then_gate")
    run_ranks(_tp_norm_rank, 2, (str(tmp_path / "rdzv"), modes), timeout_s=120)
