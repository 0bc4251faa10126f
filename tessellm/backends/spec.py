"""The backend plugin contract: pluggy hook specifications and the types they exchange.

This module holds only the contract. Everything here is read by plugin authors; keep each
docstring exact about *when* a hook is called, *in which process*, what its arguments mean and
what its return value means.

Versioning: ``TESSELLM_PLUGIN_API`` is bumped when a hook or a spec dataclass changes in a way a
plugin can observe. A plugin that needs a newer API declares ``TESSELLM_PLUGIN_API_REQUIRED`` in
its module; the registry refuses it with a clear error. Fields are only ever *added* to the spec
dataclasses, and pluggy lets an implementation accept fewer arguments than its spec, so a plugin
written against an older API keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import pluggy

PROJECT_NAME = "tessellm"
ENTRY_POINT_GROUP = "tessellm.backends"
TESSELLM_PLUGIN_API = 1

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# ---------------------------------------------------------------------------------------------
# The Backend object a plugin registers.
# ---------------------------------------------------------------------------------------------


def _no_sync() -> None:
    return None


@dataclass(frozen=True)
class Backend:
    """One hardware backend, as registered by a plugin.

    Everything device-specific that the hardware-neutral engine needs goes through this object
    (or through the hooks below, which receive it).
    """

    name: str  # the value users pass as ``--device`` ("cuda", "rocm", "cpu", "mynpu")
    device_type: str  # torch device type tensors live on ("cuda", "cpu", "xpu", "xla")
    dist_backend: str  # torch.distributed backend of its communicator ("nccl", "gloo", ...)
    priority: int  # ``--device=auto`` picks the highest-priority available backend
    is_available: Callable[[], bool]  # cheap; never raises; False when the hardware is absent
    # (free_bytes, total_bytes) of device memory; None when the device has no such notion.
    memory_info: Optional[Callable[[], tuple[int, int]]] = None
    synchronize: Callable[[], None] = _no_sync  # waits for all queued device work
    description: str = ""
    # Where this backend has been run: "hardware" (real devices), "emulation", or "untested".
    validated_on: str = "untested"
    plugin_name: str = ""  # filled in by the registry: the plugin that registered it
    # Free-form capability flags shown by ``tessellm backends --verbose`` (e.g. "fp8": True).
    capabilities: dict = field(default_factory=dict, hash=False, compare=False)

    def torch_device(self, index: int = 0):
        import torch

        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, index)


# ---------------------------------------------------------------------------------------------
# Spec dataclasses: one per hook, so fields can be added without breaking plugins.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSpec:
    """What one model's attention layers look like."""

    num_heads: int  # query heads per layer (after tensor-parallel sharding)
    num_kv_heads: int  # key/value heads per layer (GQA when fewer than num_heads)
    head_size: int
    dtype: Any  # torch dtype of q/k/v activations
    block_size: int  # tokens per KV cache block
    kv_cache_dtype: str = "auto"  # "auto" (same as dtype) or "fp8"
    sliding_window: Optional[int] = None  # a query at position p sees keys at positions > p - w


@dataclass(frozen=True)
class GraphSpec:
    """What the engine wants captured."""

    max_num_seqs: int  # the largest decode batch the scheduler can produce
    enforce_eager: bool = False  # True: the hook should return None (no capture)
    capture_sizes: Optional[tuple[int, ...]] = None  # explicit batch-size ladder, or None


@dataclass(frozen=True)
class QuantSpec:
    """A quantization scheme requested for a model's linear layers."""

    scheme: str  # "fp8", "int8", "awq", "gptq", "gguf", ...
    config: dict = field(default_factory=dict, hash=False, compare=False)  # checkpoint's config


@dataclass(frozen=True)
class OpsSpec:
    """The dtype fused elementwise ops will run in."""

    dtype: Any


# ---------------------------------------------------------------------------------------------
# Protocols of what the hooks return.
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class AttentionKernel(Protocol):
    """A paged-attention implementation. Every kernel has the same three parts.

    KV cache layout (shared by all backends): per layer, ``k_cache`` and ``v_cache`` each of
    shape ``[num_blocks, block_size, num_kv_heads, head_size]``. Token ``t`` of a sequence lives
    in block ``block_table[t // block_size]`` at offset ``t % block_size``; its *slot* is
    ``block_id * block_size + offset``.
    """

    name: str
    supports_sliding_window: bool

    def build_metadata(self, batch: Any) -> Any:
        """Called once per step, before the forward, with a ``tessellm.core.attention_batch.
        AttentionBatch``. Returns whatever ``forward`` needs (may be ``batch`` itself)."""

    def forward(self, q, k, v, k_cache, v_cache, metadata: Any, scale: float):
        """Writes this step's ``k``/``v`` ``[num_tokens, num_kv_heads, head_size]`` into the
        cache by slot mapping, then attends ``q`` ``[num_tokens, num_heads, head_size]`` over
        each sequence's cached context plus itself, causally. Returns
        ``[num_tokens, num_heads, head_size]`` in q's dtype."""


@runtime_checkable
class FusedOps(Protocol):
    """Elementwise ops a layer asks the backend for. All take and return torch tensors."""

    def rms_norm(self, x, weight, eps: float): ...

    def fused_add_rms_norm(self, x, residual, weight, eps: float):
        """Returns ``(rms_norm(x + residual), x + residual)``; may update in place."""

    def rotary_embedding(self, positions, q, k, cos_sin_cache, head_size: int):
        """NeoX-style rotation of q ``[T, H*D]`` and k ``[T, KVH*D]``; returns ``(q, k)``."""

    def silu_and_mul(self, x):
        """``silu(x[..., :d]) * x[..., d:]``."""


@runtime_checkable
class GraphRunner(Protocol):
    """Captures and replays the decode step. Created once per model runner."""

    def capture(self, model_step: Callable[..., Any], buffers: Any) -> None: ...

    def can_run(self, num_tokens: int, is_pure_decode: bool) -> bool: ...

    def run(self, num_tokens: int) -> Any: ...


@runtime_checkable
class QuantMethod(Protocol):
    """How a linear layer stores and applies quantized weights."""

    name: str

    def create_weights(self, layer, input_size: int, output_size: int, dtype) -> None: ...

    def process_weights_after_loading(self, layer) -> None: ...

    def apply(self, layer, x, bias=None): ...


# ---------------------------------------------------------------------------------------------
# Hook specifications.
# ---------------------------------------------------------------------------------------------


class BackendHookSpec:
    @hookspec
    def tessellm_register_backends(self, register: Callable[[Backend], None]) -> None:
        """Register the backends this plugin provides.

        When: once per process, when the registry first loads plugins (the engine core process,
        every worker process, and the CLI for ``tessellm backends``).
        ``register``: call it once per ``Backend``. Registering a name that another plugin
        already registered is an error naming both plugins.
        Return value: ignored. Must not touch the device (``is_available`` is asked later).
        """

    @hookspec(firstresult=True)
    def tessellm_attention_kernel(self, backend: Backend, spec: AttentionSpec) -> Optional[AttentionKernel]:
        """Return the paged-attention kernel for ``backend`` and ``spec``, or None.

        When: once per model load, in the process that runs the model (engine core or worker).
        ``backend``: the selected backend; return None unless you provide a kernel for it.
        ``spec``: the attention shapes and dtypes of the model.
        Return value: the first non-None result wins. A plugin that overrides a backend it does
        not own marks its implementation ``tryfirst=True``.
        """

    @hookspec(firstresult=True)
    def tessellm_fused_ops(self, backend: Backend, spec: OpsSpec) -> Optional[FusedOps]:
        """Return the fused elementwise ops (RMSNorm, rotary, SiLU-and-mul) for ``backend``.

        When: once per model load, in the process that runs the model.
        Return value: first non-None wins; if none does, the pure-torch reference ops are used.
        """

    @hookspec(firstresult=True)
    def tessellm_graph_runner(self, backend: Backend, spec: GraphSpec) -> Optional[GraphRunner]:
        """Return a graph runner (CUDA/HIP graphs, XLA compilation) for ``backend``, or None.

        When: once per model runner, after the KV cache is allocated, in the process that runs
        the model. None means eager execution. Must return None when ``spec.enforce_eager``.
        """

    @hookspec(firstresult=True)
    def tessellm_quant_method(self, backend: Backend, spec: QuantSpec) -> Optional[QuantMethod]:
        """Return the linear method for quantization ``spec.scheme`` on ``backend``, or None.

        When: once per model load, before weights are created, in the process that runs the
        model. None from every plugin means the scheme is unsupported on this backend: the
        engine refuses it at start-up naming the backends that do support it.
        """
