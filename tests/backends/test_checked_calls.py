"""Checked plugin calls (backends/checked.py): a plugin's ops and kernel are checked on their
first calls, then the wrapper steps aside (the plugin's own bound methods, no check left);
TESSELLM_VALIDATE_PLUGINS=1 keeps checking every call."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends import checked
from tessellm.backends.reference.attention import ReferenceAttentionKernel
from tessellm.backends.reference.ops import ReferenceOps
from tessellm.backends.registry import PluginError


class HalfWrongOps(ReferenceOps):
    """Right for the first calls, then returns float64: only a check that stays catches it."""

    def __init__(self):
        self.calls = 0

    def silu_and_mul(self, x):
        self.calls += 1
        out = super().silu_and_mul(x)
        return out if self.calls <= checked.CHECKED_OP_CALLS + 1 else out.double()


def test_ops_are_checked_on_first_calls_then_called_directly(monkeypatch):
    monkeypatch.delenv("TESSELLM_VALIDATE_PLUGINS", raising=False)
    inner = HalfWrongOps()
    ops = checked.checked_ops(inner, "mine", "mine")
    x = torch.randn(3, 8)
    for _ in range(checked.CHECKED_OP_CALLS):
        assert ops.silu_and_mul.__func__ is checked.CheckedFusedOps.silu_and_mul
        torch.testing.assert_close(ops.silu_and_mul(x), ReferenceOps().silu_and_mul(x))
    assert ops.silu_and_mul.__self__ is inner  # swapped out: the plugin's own method
    assert ops.rms_norm.__func__ is checked.CheckedFusedOps.rms_norm  # others still checked


def test_restart_checks_the_next_calls_again(monkeypatch):
    """After the warm-up (``BackendRegistry.restart_checks``) a wrapper that had stepped aside
    checks again, as if no call had run: a plugin that turns wrong then is named."""
    monkeypatch.delenv("TESSELLM_VALIDATE_PLUGINS", raising=False)
    inner = HalfWrongOps()
    ops = checked.checked_ops(inner, "mine", "mine")
    x = torch.randn(3, 8)
    for _ in range(checked.CHECKED_OP_CALLS):
        ops.silu_and_mul(x)
    assert ops.silu_and_mul.__self__ is inner
    ops.restart()
    assert ops.silu_and_mul.__func__ is checked.CheckedFusedOps.silu_and_mul
    ops.silu_and_mul(x)  # right once more
    with pytest.raises(PluginError, match=r"silu_and_mul returned dtype torch.float64"):
        ops.silu_and_mul(x)


def test_validate_plugins_checks_every_call(monkeypatch):
    monkeypatch.setenv("TESSELLM_VALIDATE_PLUGINS", "1")
    ops = checked.checked_ops(HalfWrongOps(), "mine", "mine")
    x = torch.randn(3, 8)
    for _ in range(checked.CHECKED_OP_CALLS + 1):
        ops.silu_and_mul(x)
    with pytest.raises(PluginError, match=r"^Backend plugin 'mine' \(tessellm_fused_ops for "
                                          r"backend 'mine'\): silu_and_mul returned dtype "
                                          r"torch.float64; expected dtype torch.float32\.$"):
        ops.silu_and_mul(x)


def test_rms_norm_with_the_wrong_cast_order_is_caught():
    class Late(ReferenceOps):  # multiplies by the weight in float32, then casts: not the contract
        def rms_norm(self, x, weight, eps):
            xf = x.float()
            return (weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
                    ).to(x.dtype) * 1.5

    ops = checked.checked_ops(Late(), "mine", "mine")
    x, w = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    with pytest.raises(PluginError, match=r"rms_norm returned values off by"):
        ops.rms_norm(x, w, 1e-6)


def test_gated_rms_norm_is_checked_then_called_directly(monkeypatch):
    """The optional ``gated_rms_norm`` (plugin API 19) is checked on its first calls against
    ``reference/gated_norm.py`` (a plugin that rounds at the wrong point is named), then the
    plugin's own method runs; ops without it get none from the wrapper."""
    from tessellm.backends.reference.gated_norm import gated_rms_norm

    monkeypatch.delenv("TESSELLM_VALIDATE_PLUGINS", raising=False)

    class Gated(ReferenceOps):
        def __init__(self, late: bool):
            self.late = late

        def gated_rms_norm(self, y, z, weight, group_size, eps, mode="gate_then_norm"):
            out = gated_rms_norm(y, z, weight, group_size, eps, mode)
            return out * 1.5 if self.late else out

    y, z = torch.randn(5, 32, dtype=torch.bfloat16), torch.randn(5, 32, dtype=torch.bfloat16)
    w = torch.randn(32, dtype=torch.bfloat16)
    inner = Gated(late=False)
    ops = checked.checked_ops(inner, "mine", "mine")
    for _ in range(checked.CHECKED_OP_CALLS):
        assert ops.gated_rms_norm.__self__ is ops
        assert torch.equal(ops.gated_rms_norm(y, z, w, 16, 1e-5),
                           gated_rms_norm(y, z, w, 16, 1e-5))
    assert ops.gated_rms_norm.__self__ is inner
    wrong = checked.checked_ops(Gated(late=True), "mine", "mine")
    with pytest.raises(PluginError, match=r"gated_rms_norm returned values off by .* "
                                          r"\(norm_then_gate\)"):
        wrong.gated_rms_norm(y, z, w, 16, 1e-5, "norm_then_gate")
    assert getattr(checked.checked_ops(ReferenceOps(), "m", "m"), "gated_rms_norm", None) is None


def test_partial_rotary_reference_leaves_the_tail_unrotated():
    t, d, r = 3, 8, 4
    q, k = torch.randn(t, 2 * d), torch.randn(t, d)
    cache = torch.randn(16, r)
    q2, k2 = ReferenceOps().rotary_embedding(torch.tensor([1, 5, 9]), q.clone(), k.clone(), cache, d)
    assert torch.equal(q2.view(t, 2, d)[..., r:], q.view(t, 2, d)[..., r:])
    assert not torch.allclose(q2.view(t, 2, d)[..., :r], q.view(t, 2, d)[..., :r])
    assert torch.equal(k2[:, r:], k[:, r:])


def test_checked_pieces_satisfy_their_protocols_statically():
    """Python 3.12+ checks runtime protocols with ``inspect.getattr_static``, which never reaches
    the wrappers' ``__getattr__``: every protocol member must be visible on the wrapper itself
    (on the H200's Python 3.12 the cuda conformance suite failed 23 cases without this)."""
    import inspect
    import typing

    from tessellm.backends.reference.attention import ReferenceAttentionKernel
    from tessellm.backends.spec import AttentionKernel, AttentionSpec, FusedOps

    spec = AttentionSpec(num_heads=2, num_kv_heads=1, head_size=16, dtype=torch.float32,
                         block_size=16)
    pieces = [(checked.CheckedAttentionKernel(ReferenceAttentionKernel(), "p", "b", spec,
                                              False), AttentionKernel),
              (checked.CheckedFusedOps(ReferenceOps(), "p", "b", False), FusedOps)]
    for wrapper, protocol in pieces:
        for member in typing._get_protocol_attrs(protocol):
            inspect.getattr_static(wrapper, member)  # raises AttributeError if hidden
        assert isinstance(wrapper, protocol)


def test_lora_ops_from_a_plugin_are_checked_and_the_reference_serves_without_one(monkeypatch):
    """A plugin's expand that forgets the per-adapter scaling is caught on its first call with
    the plugin's name; with no plugin answering, the registry hands out the reference."""
    from backend_plugins import make_plugin

    from tessellm.backends.reference.lora import ReferenceLoRAOps
    from tessellm.backends.registry import BackendRegistry
    from tessellm.backends.spec import LoRAOpsSpec

    monkeypatch.delenv("TESSELLM_VALIDATE_PLUGINS", raising=False)
    plugin = make_plugin("unscaled", """
        TESSELLM_OVERRIDES = ("cpu",)
        from tessellm.backends.reference.lora import ReferenceLoRAOps
        class Unscaled(ReferenceLoRAOps):
            name = "unscaled"
            def expand(self, buf, lora_b, meta, scaling, out, out_offset=0):
                super().expand(buf, lora_b, meta, scaling * 0 + 1, out, out_offset)
        @hookimpl(tryfirst=True)
        def tessellm_lora_ops(backend, spec):
            return Unscaled() if backend.name == "cpu" else None
    """)
    spec = LoRAOpsSpec(torch.float32, max_loras=2, max_rank=4)
    cpu = BackendRegistry().select("cpu")
    assert type(BackendRegistry().lora_ops(cpu, spec)) is ReferenceLoRAOps
    ops = BackendRegistry(plugins=[("unscaled", plugin)]).lora_ops(cpu, spec)
    assert isinstance(ops, checked.CheckedLoRAOps) and ops.name == "unscaled"
    meta = ops.prepare(torch.tensor([1, -1, 0], dtype=torch.int32), 2)
    buf, out = torch.zeros(3, 4), torch.zeros(3, 8)
    ops.shrink(torch.randn(3, 8), torch.randn(2, 4, 8), meta, buf)  # right: passes
    with pytest.raises(PluginError, match=r"^Backend plugin 'unscaled' \(tessellm_lora_ops for "
                                          r"backend 'cpu'\): expand returned values off by"):
        ops.expand(buf, torch.randn(2, 8, 4), meta, torch.tensor([3.0, 0.5]), out, 0)


def test_plugin_expert_lora_is_checked_against_the_reference(monkeypatch):
    """A plugin's ``fused_experts_lora`` that drops the adapters is caught on its first call,
    naming the plugin; ops without the method keep it absent (the engine runs the reference)."""
    from backend_plugins import make_plugin

    from tessellm.backends.reference.moe import route
    from tessellm.backends.registry import BackendRegistry
    from tessellm.backends.spec import ExpertLoRA, LoRAOpsSpec

    monkeypatch.delenv("TESSELLM_VALIDATE_PLUGINS", raising=False)
    plugin = make_plugin("nolora", """
        TESSELLM_OVERRIDES = ("cpu",)
        from tessellm.backends.reference.lora import ReferenceLoRAOps
        from tessellm.backends.reference.moe import fused_experts_reference
        class NoExpertLoRA(ReferenceLoRAOps):
            name = "nolora"
            def fused_experts_lora(self, hidden, w, ids, w13, w2, slots, lora, **variant):
                return fused_experts_reference(hidden, w, ids, w13, w2, **variant)
        class Plain:
            name = "plain"
            def prepare(self, token_slots, num_slots): return None
            def shrink(self, x, lora_a, meta, out): return None
            def expand(self, buf, lora_b, meta, scaling, out, out_offset=0): return None
            def expand_slices(self, buf, lora_bs, meta, scaling, out, offsets): return None
        @hookimpl(tryfirst=True)
        def tessellm_lora_ops(backend, spec):
            if backend.name != "cpu":
                return None
            return Plain() if spec.max_rank == 2 else NoExpertLoRA()
    """)
    registry = BackendRegistry(plugins=[("nolora", plugin)])
    cpu = registry.select("cpu")
    assert not hasattr(registry.lora_ops(cpu, LoRAOpsSpec(torch.float32, 2, 2)),
                       "fused_experts_lora")
    ops = registry.lora_ops(cpu, LoRAOpsSpec(torch.float32, max_loras=2, max_rank=4))
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    weights, ids = route(r(3, 4), 2)
    lora = ExpertLoRA(r(2, 4, 8, 16), r(2, 4, 16, 4), r(2, 4, 4, 8), r(2, 4, 16, 4),
                      torch.tensor([2.0, 1.0]))
    with pytest.raises(PluginError, match=r"^Backend plugin 'nolora' \(tessellm_lora_ops for "
                                          r"backend 'cpu'\): fused_experts_lora returned values "
                                          r"off by"):
        ops.fused_experts_lora(r(3, 16), weights, ids, r(4, 16, 16), r(4, 16, 8),
                               torch.tensor([0, -1, 1], dtype=torch.int32), lora)


def test_probe_rows_need_cache_slots_of_their_own():
    """The attention probe's reference takes the rows' own k/v; the kernel reads them back
    from the cache. Rows whose slot another row of the step writes too (the memory profile's
    step), or that write none (-1), are not probed."""
    slots = torch.tensor([4, 5, 6, 7, 20, 21])
    assert checked._own_slots(slots, 0, 4)
    assert checked._own_slots(slots, 4, 2)
    profile = torch.tensor([0, 1, 2, 0, 1, 2, 3])  # every table entry block 0, block size 3
    assert not checked._own_slots(profile, 0, 2)
    assert not checked._own_slots(profile, 3, 4)
    assert not checked._own_slots(torch.tensor([-1, 3]), 0, 1)
    assert not checked._own_slots(torch.tensor([3, 3, 5]), 0, 2)


@pytest.mark.parametrize("family", ["granite-4h", "gpt-oss"])
def test_memory_profile_step_passes_the_checked_kernel(family, tmp_path, monkeypatch):
    """The memory profile's step (``RunnerProfile.profile_run``, on GPUs only) writes every
    token's k/v to block 0, so the cache holds other rows' keys. Probed, a right kernel failed
    there on an H100 wherever the output depends on which key a slot holds: Granite 4.0-H (a
    Mamba layer before the attention: rows differ by position) off by ~3, gpt-oss (attention
    sinks) by ~2%. Here the cpu backend's kernel, checked on every call, through that step
    and then a real one (whose rows are probed)."""
    from tessellm import LLM, SamplingParams
    from tests.models.variant_parity import save_tiny

    path = str(tmp_path / family)
    if family == "gpt-oss":
        from tests.models.test_gpt_oss import save_gpt_oss

        save_gpt_oss(path)
    else:
        from tests.models.test_granite_moe_hybrid import granite_hybrid_config

        save_tiny(granite_hybrid_config(), path)
    monkeypatch.setenv("TESSELLM_VALIDATE_PLUGINS", "1")
    with LLM(path, device="cpu", dtype="float32", max_num_seqs=4, max_model_len=128) as llm:
        runner = llm.engine.core.executor.worker.runner
        kernels = getattr(runner.kernel, "kernels", [runner.kernel])  # gpt-oss: per window
        assert all(isinstance(k, checked.CheckedAttentionKernel) for k in kernels)
        cache = runner.kv_layers()[0].k_cache
        runner.profile_run(64)  # 64 tokens over 4 rows, all in block 0; frees the cache
        runner.allocate_kv_cache(cache.shape[0], cache.dtype)  # as the worker does next
        out = llm.generate([{"prompt_token_ids": [5, 9, 17, 30, 41]}],
                           SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


class TurnsWrong(ReferenceAttentionKernel):
    """The reference kernel, whose outputs come back scaled once ``wrong`` is set: a bug the
    steps before it never met (a shape only real prompts reach)."""

    wrong = False

    def forward(self, q, k, v, k_cache, v_cache, metadata, scale, **kwargs):
        out = super().forward(q, k, v, k_cache, v_cache, metadata, scale, **kwargs)
        return out * 1.5 if self.wrong else out


def _paged(query_lens, ctx_lens, seed=0):
    from tessellm.testing.harness import make_paged_step

    return make_paged_step(query_lens, ctx_lens, num_kv_heads=1, group=2, head_size=16,
                           block_size=4, dtype=torch.float32, device=torch.device("cpu"), seed=seed)


def _run(kernel, step):
    return kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                          kernel.build_metadata(step.batch), step.scale)


def test_attention_checks_are_not_used_up_before_the_first_request(monkeypatch):
    """Only steps whose rows were probed count toward ``CHECKED_STEPS``: the memory profile's
    step (every row in block 0, so rows share cache slots: never probed) and graph capture's
    steps (no host copies: one build per captured size) leave the checks to the first request's
    prefill, where a wrong result is caught. Decode steps (cached context, nothing to probe)
    end the checks only after ``UNPROBED_STEPS``."""
    import dataclasses

    from tessellm.backends.spec import AttentionSpec

    monkeypatch.delenv("TESSELLM_VALIDATE_PLUGINS", raising=False)
    spec = AttentionSpec(num_heads=2, num_kv_heads=1, head_size=16, dtype=torch.float32,
                         block_size=4)
    inner = TurnsWrong()
    kernel = checked.CheckedAttentionKernel(inner, "mine", "mine", spec, False)
    profile = _paged([4, 4], [0, 0])
    profile.batch.slot_mapping = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # both rows in block 0
    _run(kernel, profile)
    decode = _paged([1, 1], [5, 9], seed=1)
    captured = dataclasses.replace(decode.batch, query_start_loc_host=[], seq_lens_host=[])
    for _ in range(8):  # a captured size each
        kernel.forward(decode.q, decode.k, decode.v, decode.k_cache, decode.v_cache,
                       kernel.build_metadata(captured), decode.scale)
    for _ in range(3):
        _run(kernel, decode)
    inner.wrong = True
    with pytest.raises(PluginError, match=r"^Backend plugin 'mine' \(tessellm_attention_kernel "
                                          r"for backend 'mine'\): forward returned values off by"):
        _run(kernel, _paged([6], [0], seed=2))
    inner.wrong = False
    for seed in range(1, checked.CHECKED_STEPS):  # the caught step was the first probed one
        prefill = _paged([5, 3], [0, 0], seed)
        torch.testing.assert_close(_run(kernel, prefill), prefill.ref_out)
        assert kernel.forward.__func__ is checked.CheckedAttentionKernel.forward
    _run(kernel, decode)
    assert kernel.forward.__self__ is inner  # swapped out: the plugin's own method
    decodes_only = checked.CheckedAttentionKernel(TurnsWrong(), "mine", "mine", spec, False)
    for _ in range(checked.UNPROBED_STEPS):
        _run(decodes_only, decode)
    assert decodes_only.forward.__func__ is checked.CheckedAttentionKernel.forward
    _run(decodes_only, decode)
    assert decodes_only.forward.__self__ is decodes_only._inner


def test_the_first_requests_after_the_profile_and_warm_up_are_checked(fake_site, tiny_llama, monkeypatch):
    """An engine whose memory profile and kernel warm-up have run (cpu: one 8-token request,
    a prefill and two decodes) still checks its attention on the first requests' prefills, as
    many as with no warm-up (CHECKED_STEPS): a third-party kernel right on the first request
    and wrong on the second is named. Counted by calls, the warm-up's three steps had used up
    the checks; counted with the warm-up's probed prefill, the first request's ended them: in
    both the wrong values went out."""
    import sys

    from tessellm import LLM, SamplingParams

    fake_site("fakeplug-turns", {"turns": "fakeplug_turns"}, {"fakeplug_turns": """
        from tessellm.backends.spec import hookimpl
        from test_checked_calls import TurnsWrong
        TESSELLM_OVERRIDES = ("cpu",)
        KERNELS = []
        @hookimpl(tryfirst=True)
        def tessellm_attention_kernel(backend, spec):
            if backend.name != "cpu":
                return None
            KERNELS.append(TurnsWrong(spec.sliding_window))
            return KERNELS[-1]
    """})
    monkeypatch.setenv("TESSELLM_PLUGINS", "cpu,turns")
    monkeypatch.delenv("TESSELLM_VALIDATE_PLUGINS", raising=False)
    with LLM(tiny_llama, device="cpu", dtype="float32", max_num_seqs=4, max_model_len=128,
             kernel_warmup=True) as llm:
        assert llm.engine.warmup.steps == 3
        runner = llm.engine.core.executor.worker.runner
        assert isinstance(runner.kernel, checked.CheckedAttentionKernel)
        cache = runner.kv_layers()[0].k_cache
        runner.profile_run(64)  # the GPU's profile step: every row in block 0
        runner.allocate_kv_cache(cache.shape[0], cache.dtype)
        greedy = SamplingParams(max_tokens=2, temperature=0)
        assert checked.CHECKED_STEPS == 2  # the first request's prefill, then the second's
        llm.generate([{"prompt_token_ids": list(range(50, 80))}], greedy, use_tqdm=False)
        for kernel in sys.modules["fakeplug_turns"].KERNELS:
            kernel.wrong = True
        with pytest.raises(PluginError, match=r"^Backend plugin 'turns' \(tessellm_attention_kernel "
                                              r"for backend 'cpu'\): forward returned values off by"):
            llm.generate([{"prompt_token_ids": list(range(3, 40))}], greedy, use_tqdm=False)
