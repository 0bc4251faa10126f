"""The cpu backend plugin, always available: paged attention (decodes through the C kernel of
``csrc/paged_decode.c`` where it builds, batched SDPA otherwise; ``attention.py``).

Graph capture is ``torch.compile`` of the decode step (``graph_runner.py``), opt-in with
``TESSELLM_CPU_COMPILE=1``: measured on 2 cores it saves 3-13% of a decode step (3% of a
serving run) and costs minutes of compilation at start-up on a cold inductor cache
(benchmarks/README.md, "CPU decode compiled").
"""

from __future__ import annotations

from tessellm.backends.spec import AttentionSpec, Backend, GraphSpec, LogitsOpsSpec, OpsSpec, hookimpl

NAME = "cpu"


def _memory_info() -> tuple[int, int]:
    import os

    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    avail = os.sysconf("SC_AVPHYS_PAGES") * page_size
    return avail, pages * page_size


@hookimpl
def tessellm_register_backends(register):
    register(Backend(
        name=NAME, device_type="cpu", dist_backend="gloo", priority=0,
        is_available=lambda: True, memory_info=_memory_info,
        description="Paged attention on the host CPU (C decode kernel where it builds, else SDPA).",
        validated_on="hardware",
        validation_note="Conformance suite on every CI run; with TESSELLM_CPU_COMPILE=1 the "
                        "compiled decode step passes the graph tests and greedy parity with eager.",
        capabilities={"graph_capture": "opt-in: TESSELLM_CPU_COMPILE=1 (torch.compile)",
                      "quantization": ["int8", "fp8", "fp8_block", "awq", "gptq", "gguf",
                                       "bitsandbytes"], "logit_softcap": True,
                      "attention_sinks": True, "mla": True, "mamba2": True, "gated_delta": True,
                      "key_limits": True},
    ))


@hookimpl
def tessellm_attention_kernel(backend: Backend, spec: AttentionSpec):
    if backend.name != NAME:
        return None
    if getattr(spec, "mla_value_size", None) is not None:  # DeepSeek's latent cache
        from tessellm.backends.cpu.mla_attention import CpuMLAAttentionKernel

        return CpuMLAAttentionKernel(spec)
    from tessellm.backends.cpu.attention import CpuAttentionKernel

    return CpuAttentionKernel(spec)


@hookimpl
def tessellm_fused_ops(backend: Backend, spec: OpsSpec):
    if backend.name != NAME:
        return None
    from tessellm.backends.cpu.ops import CpuOps

    return CpuOps()


@hookimpl
def tessellm_logits_ops(backend: Backend, spec: LogitsOpsSpec):
    """The reference bitmask and a two-pass argmax (``cpu/ops.py``: torch's is a scalar loop)."""
    if backend.name != NAME:
        return None
    from tessellm.backends.cpu.ops import CpuLogitsOps

    return CpuLogitsOps()


@hookimpl
def tessellm_graph_runner(backend: Backend, spec: GraphSpec):
    """``torch.compile`` of the decode step when TESSELLM_CPU_COMPILE asks for it, else None."""
    if backend.name != NAME or spec.enforce_eager:
        return None
    from tessellm import envs

    if not envs.cpu_compile():  # unset: eager, the measured better default on 2 cores
        return None
    from tessellm.backends.cpu.graph_runner import CompiledDecodeRunner, cpu_capture_sizes

    return CompiledDecodeRunner(spec.capture_sizes or cpu_capture_sizes(spec.max_num_seqs))


@hookimpl
def tessellm_quant_method(backend: Backend, spec):
    """int8, fp8 (W8A8 emulated in float32), awq, gptq and gguf through torch ops (int4 and
    grouped int8 through torch's CPU int4 kernel, ``cpu/quant_ops.py``)."""
    if backend.name != NAME:
        return None
    from tessellm.backends.cpu.quant_ops import CpuQuantOps, direct_apply
    from tessellm.quantization import make_quant_method

    method = make_quant_method(spec, CpuQuantOps())
    if method is not None:
        direct_apply(method)  # repacked int4/int8 layers skip the generic apply's glue
    return method
