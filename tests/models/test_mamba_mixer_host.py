"""Host work of the Mamba2 mixer's eager steps (``layers/mamba_mixer.py``): per layer and step,
the mixer's own code around the backend's ops copies nothing (in_proj's parts go to the ops
as views) and does not recompute ``A = -exp(A_log)``, which is made once and again only after
a weight update. Counted with a dispatch mode on the CPU, the backend's ops (which do run)
left out of the count."""

from __future__ import annotations

import collections
import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tessellm.backends.reference.ops import ReferenceOps
from tessellm.core.mamba_state import MambaStateCache, make_batch
from tessellm.core.runner_sleep import mark_weights_changed
from tessellm.layers.context import ModelContext
from tessellm.layers.mamba_mixer import MambaMixer2, MambaShape

SHAPE = MambaShape(hidden_size=32, num_heads=4, head_dim=16, n_groups=2, d_state=8, d_conv=4,
                   chunk_size=8, proj_bias=False, conv_bias=True, eps=1e-5,
                   dt_limit=(0.0, float("inf")))


class _Count(TorchDispatchMode):
    """Aten ops by name, except while ``paused``."""

    def __init__(self):
        super().__init__()
        self.ops, self.off = collections.Counter(), 0

    @contextlib.contextmanager
    def paused(self):
        self.off += 1
        try:
            yield
        finally:
            self.off -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.off:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _OpsUncounted:
    """The backend's ops, each run with the counter paused: what is counted is the mixer's."""

    def __init__(self, ops, count: _Count):
        self._ops, self._count = ops, count

    def __getattr__(self, name):
        value = getattr(self._ops, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            with self._count.paused():
                return value(*args, **kwargs)
        return call


def _mixer(count: _Count) -> tuple[MambaMixer2, MambaStateCache]:
    torch.manual_seed(0)
    ctx = ModelContext(ops=_OpsUncounted(ReferenceOps(), count), make_attention_kernel=None,
                       dtype=torch.float32, device=torch.device("cpu"))
    mixer = MambaMixer2(SHAPE, ctx)
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    cache = MambaStateCache([mixer], num_slots=3, device=torch.device("cpu"), dtype=torch.float32)
    return mixer, cache


def test_mixer_step_copies_nothing_and_reuses_its_decay():
    count = _Count()
    mixer, cache = _mixer(count)
    hidden = torch.randn(1 + 1 + 7 + 12, SHAPE.hidden_size)
    cache.step.batch = make_batch([1, 1, 7, 12], [2, 0, 1, 3], torch.device("cpu"))
    with torch.no_grad():
        mixer(hidden)  # the first step makes A
        with count:
            out = mixer(hidden)
    assert out.shape == hidden.shape and torch.isfinite(out).all()
    own = count.ops
    assert own["exp"] == 0 and own["neg"] == 0, f"A recomputed in a step: {dict(own)}"
    copies = {k: own[k] for k in ("clone", "copy_", "_to_copy", "contiguous") if own[k]}
    assert not copies, f"the mixer's own code copied tensors: {copies}"


def test_mixer_decay_follows_a_weight_update():
    mixer, _ = _mixer(_Count())
    first = mixer.decay()
    assert mixer.decay() is first
    torch.testing.assert_close(first, -torch.exp(mixer.A_log.float()), atol=0, rtol=0)
    new = torch.linspace(-1.0, 1.0, SHAPE.num_heads)
    mixer.load_checkpoint_tensor("A_log", new)  # through .data: the version moves only when
    mark_weights_changed([mixer])  # the engine marks it (load_weights, wake-up)
    torch.testing.assert_close(mixer.decay(), -torch.exp(new), atol=0, rtol=0)


def test_derived_weights_are_made_afresh_under_any_device_graph_capture(monkeypatch):
    """A derived tensor is never kept while a graph is captured on the weight's device (CUDA,
    XPU, any device module that reports a capture): the graph must read the weight itself, and
    a kept tensor replaced after a weight update would be freed under it. Here the cpu module
    stands in for such a device."""
    from tessellm.layers.derived import DerivedWeight, neg_exp_float

    derived, weight = DerivedWeight(neg_exp_float), torch.randn(4)
    kept = derived(weight)
    assert derived(weight) is kept  # no capture: kept
    monkeypatch.setattr(torch.cpu, "is_current_stream_capturing", lambda: True, raising=False)
    during = derived(weight)
    assert during is not kept and torch.equal(during, kept)
    assert derived(weight) is not during  # nothing kept from inside the capture


def test_ops_without_the_strided_flag_get_contiguous_rows():
    """A plugin's own Mamba ops (plugin API < 17, no ``mamba_strided_inputs``) get ``x`` and
    ``dt`` as contiguous copies, and the step's output is the reference ops' one."""
    seen = []

    class PluginOps(ReferenceOps):
        def mamba_conv1d(self, x, *args, **kwargs):
            seen.append(("x", x.is_contiguous()))
            return super().mamba_conv1d(x, *args, **kwargs)

        def mamba_chunk_scan(self, x, dt, *args, **kwargs):
            seen.append(("dt", dt.is_contiguous()))
            return super().mamba_chunk_scan(x, dt, *args, **kwargs)

    assert ReferenceOps.mamba_strided_inputs and not PluginOps.mamba_strided_inputs
    hidden = torch.randn(7 + 12, SHAPE.hidden_size)
    outs = []
    for ops in (ReferenceOps(), PluginOps()):
        mixer, cache = _mixer(_Count())
        mixer.ops = ops
        cache.step.batch = make_batch([7, 12], [0, 1], torch.device("cpu"))
        with torch.no_grad():
            outs.append(mixer(hidden))
    assert seen and all(contiguous for _, contiguous in seen), seen
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


def test_whole_step_rows_are_not_sliced():
    """A step of prefills alone (a cached prompt's computed tail) or of decodes alone hands the
    ops x, dt, B and C whole, and the conv its weight as a view made once: no slice or select
    op in the mixer's own code a layer and step (a mixed step slices the two parts)."""
    count = _Count()
    mixer, cache = _mixer(count)
    for counts, slots in (([7, 12], [0, 1]), ([1, 1, 1], [2, 0, 1])):
        hidden = torch.randn(sum(counts), SHAPE.hidden_size)
        cache.step.batch = make_batch(counts, slots, torch.device("cpu"))
        with torch.no_grad():
            mixer(hidden)
            count.ops.clear()
            with count:
                mixer(hidden)
        sliced = {k: count.ops[k] for k in ("slice", "select") if count.ops[k]}
        assert not sliced, f"{counts}: the mixer sliced whole rows: {sliced}"


def test_a_steps_batch_goes_up_in_one_copy():
    """``make_batch`` uploads a step's offsets and slots, the prefills' own included, as views
    of one tensor (one host-to-device copy a step), each starting 16-byte aligned like a tensor
    of its own (the Triton kernels' one variant), with the values of the lists."""
    batch = make_batch([1, 1, 1, 7, 12], [4, 2, 0, 1, 3], torch.device("cpu"))
    parts = (batch.query_start_loc, batch.state_indices, batch.prefills.query_start_loc,
             batch.prefills.state_indices)
    assert len({t.untyped_storage().data_ptr() for t in parts}) == 1
    assert all(t.data_ptr() % 16 == 0 for t in parts)
    assert batch.query_start_loc.tolist() == [0, 1, 2, 3, 10, 22]
    assert batch.state_indices.tolist() == [4, 2, 0, 1, 3]
    assert batch.prefills.query_start_loc.tolist() == [0, 7, 19]
    assert batch.prefills.state_indices.tolist() == [1, 3]
    decodes = make_batch([1, 1], [2, 0], torch.device("cpu"))
    assert decodes.prefills is None and decodes.state_indices.tolist() == [2, 0]


def test_a_step_saving_inside_it_adds_no_op_of_the_mixers():
    """A cached prompt's rest saving its state inside the step (``MambaBatch.state_saves``):
    with ops that keep the conv's and the scan's saves themselves (``mamba_conv_state_saves``:
    the reference conv; ``mamba_state_saves``: here the Triton scan, in the interpreter) the
    mixer's own code adds no op for them; with a conv of API 22 (no ``snapshots``) it copies
    the conv snapshot from the conv's input (one copy a layer); with a scan that does not keep
    them either, it runs the scan once per piece: two calls, a copy and a cat. The snapshots
    agree."""
    import pytest

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (the Triton scan on host tensors)")
    from tessellm.kernels.fused_ops import TritonOps

    triton_ops = TritonOps()

    class SavingOps(ReferenceOps):
        mamba_state_saves = True

        def mamba_chunk_scan(self, *args, **kwargs):
            return triton_ops.mamba_chunk_scan(*args, **kwargs)

    class Api22ConvOps(SavingOps):
        def mamba_conv1d(self, x, weight, bias, conv_state, batch, activation="silu"):
            return ReferenceOps.mamba_conv1d(x, weight, bias, conv_state, batch, activation)

    class PieceOps(Api22ConvOps):
        def mamba_chunk_scan(self, *args, **kwargs):
            return triton_ops.mamba_chunk_scan(*args, **kwargs)

    assert not Api22ConvOps.mamba_conv_state_saves and Api22ConvOps.mamba_state_saves
    assert not PieceOps.mamba_state_saves
    got = {}
    for name, ops in (("saving", SavingOps()), ("api22_conv", Api22ConvOps()),
                      ("pieces", PieceOps())):
        count = _Count()
        mixer, cache = _mixer(count)
        mixer.ops = _OpsUncounted(ops, count)
        cache.allocate_snapshots(2)
        hidden = torch.randn(7 + 40, SHAPE.hidden_size, generator=torch.Generator().manual_seed(1))
        cache.step.batch = make_batch([7, 40], [0, 1], torch.device("cpu"), saves=[(1, 32, 1)])
        scans = []
        inner = ops.mamba_chunk_scan
        ops.mamba_chunk_scan = lambda *a, **kw: (scans.append(1), inner(*a, **kw))[1]
        with torch.no_grad(), count:
            out = mixer(hidden)
        own = {k: count.ops[k] for k in ("cat", "copy_", "_foreach_copy_", "index_copy_", "index")
               if count.ops[k]}
        got[name] = (out, [p.clone() for p in cache.snapshots[0]], own, len(scans))
    out, pools, own, calls = got["saving"]
    assert calls == 1 and not own, own
    c_out, c_pools, c_own, c_calls = got["api22_conv"]
    assert c_calls == 1 and c_own == {"_foreach_copy_": 1}, c_own  # the conv snapshot's copy
    p_out, p_pools, p_own, p_calls = got["pieces"]
    assert p_calls == 2 and p_own.get("cat") and p_own.get("_foreach_copy_") == 2, p_own
    for other_out, other_pools in ((c_out, c_pools), (p_out, p_pools)):
        torch.testing.assert_close(out, other_out, rtol=0, atol=0)
        for a, b in zip(pools, other_pools):
            assert b[1].abs().sum() > 0
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# Top-level aten ops of one Mamba2 layer's eager step on a cached prompt's remainder (its
# residual-add RMSNorm and mixer through the Triton ops, the kernels' own work not counted):
# 12 since session 21 (17 before: the norm's reshapes, promote_types and view around rows
# already 2-D). A bound, so a change that adds host ops a layer fails here.
LAYER_OPS_MAX = 12


def test_cached_remainder_layer_runs_few_host_ops(monkeypatch):
    """One layer (the residual-add RMSNorm, then the mixer) of a prefix hit's remainder step
    (one sequence of 48 tokens continuing its slot's state) through the Triton backends' ops
    (in the interpreter): at most ``LAYER_OPS_MAX`` top-level aten ops outside the kernel
    launches (``benchmarks/hybrid_host_step.py``'s ``ops_per_layer`` on a GPU); none of them
    a ``promote_types``, and the norm makes no view of its rows; the environment is read for
    the step's first layer only."""
    import os

    import pytest

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (the Triton ops on host tensors)")
    import triton.runtime.interpreter as interpreter

    from tessellm.kernels.fused_ops import TritonOps
    from tessellm.layers.norm import RMSNorm

    launch = interpreter.InterpretedFunction.run

    def marked(self, *args, **kwargs):
        with torch.profiler.record_function("triton_kernel"):
            return launch(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", marked)
    from tessellm import envs

    reads, read = [], envs.ssd_scan
    monkeypatch.setattr(envs, "ssd_scan", lambda: (reads.append(1), read())[1])
    ops = TritonOps()
    torch.manual_seed(0)
    ctx = ModelContext(ops=ops, make_attention_kernel=None, dtype=torch.float32,
                       device=torch.device("cpu"))
    mixer = MambaMixer2(SHAPE, ctx)
    norm = RMSNorm(SHAPE.hidden_size, 1e-5, ops)
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    cache = MambaStateCache([mixer], num_slots=3, device=torch.device("cpu"), dtype=torch.float32)
    cache.step.batch = make_batch([48], [1], torch.device("cpu"))
    hidden, residual = torch.randn(2, 48, SHAPE.hidden_size).unbind(0)

    def layer():
        h, r = norm(hidden, residual.clone())
        return mixer(h), r

    with torch.no_grad():
        want = layer()  # the first call makes A and the conv's weight view
        with torch.profiler.profile() as prof:
            got = layer()
    torch.testing.assert_close(got[1], want[1])
    counts = collections.Counter()
    for event in prof.events():
        parent, top = event.cpu_parent, event.name.startswith("aten::")
        while parent is not None and top:
            top = not (parent.name.startswith("aten::") or parent.name == "triton_kernel")
            parent = parent.cpu_parent
        if top and event.name != "aten::clone":  # the test's own copy of the residual
            counts[event.name] += 1
    assert sum(counts.values()) <= LAYER_OPS_MAX, dict(counts)
    assert not counts["aten::promote_types"] and not counts["aten::view"], dict(counts)
    # the scan's choice of kernel (TESSELLM_SSD_SCAN, the lengths) is made once for the step's
    # batch, not again by each layer (here the second call on the same batch)
    assert len(reads) == 1
