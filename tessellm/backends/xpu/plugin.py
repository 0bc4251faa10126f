"""The xpu backend plugin: Intel GPUs through ``torch.xpu``.

Attention and fused ops come from intel-extension-for-pytorch when it is installed (its
PagedAttention flash-varlen ops and ``ipex.llm.functional``), else a pure-torch path that runs
on any device. Graph capture: ``torch.xpu.XPUGraph`` where the installed torch has it.
Communicator: xccl (torch >= 2.8). Nothing here has run on an Intel GPU: see VALIDATION_NOTE.
"""

from __future__ import annotations

from tessellm.backends.spec import (QuantSpec, VALIDATED_UNTESTED, AttentionSpec, Backend, GraphSpec,
                                    OpsSpec, hookimpl)

NAME = "xpu"
VALIDATION_NOTE = ("Never run on an Intel GPU. Lane xpu-ipex-cpu (intel-extension-for-pytorch "
                   "2.8.0 CPU build, torch 2.8.0): IPEX's PagedAttention.flash_attn_varlen_func + "
                   "reshape_and_cache and ipex.llm.functional rms_norm/add_rms_norm/silu_mul ran "
                   "for real on CPU tensors (emulate): the conformance suite and greedy parity "
                   "with the cpu backend on SmolLM2 and a tiny Llama. Without IPEX: pure torch.")


def _is_available() -> bool:
    import torch

    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _memory_info() -> tuple[int, int]:
    import torch

    return torch.xpu.mem_get_info()


def _synchronize() -> None:
    import torch

    torch.xpu.synchronize()


def _ipex_version():
    """The installed IPEX's version, without importing it (registration stays cheap)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("intel_extension_for_pytorch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _quant_schemes() -> list[str]:
    # int4 (awq, gptq): IPEX's WOQ, else the torch int4 op behind it (ipex_quant.py)
    return ["int8", "fp8", "fp8_block", "gguf", "bitsandbytes"] + (["awq", "gptq"] if _ipex_version() else [])


def _paths() -> str:
    """What runs for real (``tessellm backends``): which framework path each piece takes."""
    version = _ipex_version()
    if version is None:
        return "pure torch (intel_extension_for_pytorch not installed)"
    return (f"intel_extension_for_pytorch {version}: attention IPEX PagedAttention "
            "(flash_attn_varlen_func; pure torch for sliding windows on CPU), fused ops "
            "ipex.llm.functional, int8/int4 IPEX WOQ linear on CPU tensors (torch ops on xpu "
            "tensors, fp8, gguf)")


@hookimpl
def tessellm_register_backends(register):
    register(Backend(
        name=NAME, device_type="xpu", dist_backend="xccl", priority=70,
        is_available=_is_available, memory_info=_memory_info, synchronize=_synchronize,
        description="Intel GPUs (torch.xpu): IPEX paged attention when installed, else pure "
                    "torch; XPU graphs; xccl.",
        validated_on=VALIDATED_UNTESTED, validation_note=VALIDATION_NOTE,
        capabilities={"graph_capture": True, "quantization": _quant_schemes(),
                      "kv_cache_dtypes": ["auto"],
                      "sliding_window": True, "logit_softcap": True, "attention_sinks": True,
                      "key_limits": True, "ipex": "optional",
                      "lane": "xpu-ipex-cpu: IPEX attention + fused ops on CPU tensors",
                      "paths": _paths()},
    ))


@hookimpl
def tessellm_attention_kernel(backend: Backend, spec: AttentionSpec):
    if backend.name != NAME:
        return None
    from tessellm.backends.xpu.ipex_attention import IpexAttentionKernel, ipex_paged_attention_ops

    ops = ipex_paged_attention_ops()
    # IPEX's CPU varlen kernel gets sliding windows wrong (the xpu lane, IPEX 2.8.0): windowed
    # models take the pure-torch path unless an Intel GPU runs IPEX's XPU kernel. Soft-capped
    # layers take it everywhere (IPEX's cap has not been run here), and so do layers with
    # attention sinks or key limits (IPEX's kernel has neither).
    if (ops is not None and spec.logit_softcap is None and not spec.attention_sinks
            and not getattr(spec, "prefill_key_limits", False)
            and (spec.sliding_window is None or _is_available())):
        return IpexAttentionKernel(spec, ops)
    from tessellm.backends.reference.padded_attention import PaddedTorchAttentionKernel

    return PaddedTorchAttentionKernel(spec)


@hookimpl
def tessellm_fused_ops(backend: Backend, spec: OpsSpec):
    if backend.name != NAME:
        return None
    from tessellm.backends.xpu.ipex_ops import IpexOps, ipex_functional

    functional = ipex_functional()
    if functional is not None:
        return IpexOps(functional)
    from tessellm.backends.reference.ops import ReferenceOps

    return ReferenceOps()


@hookimpl
def tessellm_graph_runner(backend: Backend, spec: GraphSpec):
    if backend.name != NAME or spec.enforce_eager:
        return None
    import torch

    if not hasattr(getattr(torch, "xpu", None), "XPUGraph"):
        return None
    from tessellm.backends.reference.device_graph_runner import TorchDeviceGraphRunner, default_capture_sizes

    return TorchDeviceGraphRunner(spec.capture_sizes or default_capture_sizes(spec.max_num_seqs),
                                  device_api="xpu", name="xpu-graphs")

@hookimpl
def tessellm_quant_method(backend: Backend, spec: QuantSpec):
    """Weight-only int8 and int4 (awq, gptq) through IPEX's WOQ linear when IPEX is installed
    (``ipex_quant.py``); fp8 (emulated W8A8), gguf, and everything without IPEX through the
    device-agnostic torch ops."""
    if backend.name != NAME:
        return None
    from tessellm.backends.reference.quant_ops import TorchQuantOps
    from tessellm.backends.xpu.ipex_quant import IpexQuantOps, ipex_woq_available
    from tessellm.quantization import make_quant_method

    return make_quant_method(spec, IpexQuantOps() if ipex_woq_available() else TorchQuantOps())
