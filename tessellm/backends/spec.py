"""The backend plugin contract: pluggy hook specifications and the types they exchange.

This module holds only the contract. Everything here is read by plugin authors; each docstring
says *when* a hook is called, *in which process*, what its arguments mean and what its return
value means. docs/plugins.md is the tutorial; this file is the reference.

Versioning
----------
``TESSELLM_PLUGIN_API`` is the contract's version, an integer. It is bumped when a hook, a spec
dataclass or a returned protocol changes in a way a plugin can observe. Rules that keep old
plugins working:

- fields are only ever *added* to the spec dataclasses (with defaults), never renamed/removed;
- pluggy lets an implementation accept *fewer* arguments than its spec, so a new hook argument
  does not break an old implementation;
- a plugin that needs features of a newer API sets ``TESSELLM_PLUGIN_API_REQUIRED = N`` in its
  plugin module; the registry refuses it with one sentence naming the plugin, ``N`` and the API
  this tessellm provides (``PluginError``), instead of failing later in an obscure place.

History: 1 = the first published contract (this one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import pluggy

if TYPE_CHECKING:
    import torch

PROJECT_NAME = "tessellm"
ENTRY_POINT_GROUP = "tessellm.backends"
TESSELLM_PLUGIN_API = 1
# The module attribute a plugin sets to the API version it needs (default: 1).
API_REQUIRED_ATTR = "TESSELLM_PLUGIN_API_REQUIRED"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

# Values of ``Backend.validated_on``.
VALIDATED_HARDWARE = "hardware"  # run on the real device, conformance suite passed
VALIDATED_EMULATION = "emulation"  # run only emulated (Triton interpreter, XLA on CPU, ...)
VALIDATED_UNTESTED = "untested"  # written against the documented APIs, never run
VALIDATION_LEVELS = (VALIDATED_HARDWARE, VALIDATED_EMULATION, VALIDATED_UNTESTED)


# ---------------------------------------------------------------------------------------------
# The Backend object a plugin registers.
# ---------------------------------------------------------------------------------------------


def _no_sync() -> None:
    return None


@dataclass(frozen=True)
class Backend:
    """One hardware backend, as registered by a plugin.

    Everything device-specific that the hardware-neutral engine needs goes through this object
    (or through the hooks below, which receive it). Frozen: a backend never changes once
    registered.
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
    # Where this backend has been run: one of VALIDATION_LEVELS. Say the truth: "hardware" only
    # when the conformance suite passed on the real device.
    validated_on: str = VALIDATED_UNTESTED
    # Free text: what exactly was run, where, when (shown by ``tessellm backends``).
    validation_note: str = ""
    plugin_name: str = ""  # filled in by the registry: the plugin that registered it
    # Capability flags shown by ``tessellm backends`` (e.g. {"graph_capture": True,
    # "quantization": ["fp8"], "kv_cache_dtypes": ["auto"]}). Declared, not discovered.
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
    max_model_len: Optional[int] = None  # longest sequence the engine will run; None: unknown
    max_num_seqs: Optional[int] = None  # largest batch the scheduler can produce; None: unknown


@dataclass(frozen=True)
class GraphSpec:
    """What the engine wants captured."""

    max_num_seqs: int  # the largest decode batch the scheduler can produce
    enforce_eager: bool = False  # True: the hook must return None (no capture)
    capture_sizes: Optional[tuple[int, ...]] = None  # explicit batch-size ladder, or None
    dtype: Any = None  # torch dtype the model runs in; None: unknown


@dataclass(frozen=True)
class QuantSpec:
    """A quantization scheme requested for a model's linear layers."""

    scheme: str  # "fp8", "int8", "awq", "gptq", "gguf", ...
    config: dict = field(default_factory=dict, hash=False, compare=False)  # checkpoint's config
    dtype: Any = None  # activation dtype; None: unknown


@dataclass(frozen=True)
class OpsSpec:
    """The dtype fused elementwise ops will run in."""

    dtype: Any


# ---------------------------------------------------------------------------------------------
# The step's attention inputs, as the engine hands them to a plugin's attention kernel.
# ---------------------------------------------------------------------------------------------


@dataclass
class AttentionBatch:
    """One step's sequences, flattened. Decode sequences (one query token) come first.

    Picture for three sequences, the first a decode, the others prefill chunks::

        tokens (flat):   | d0 | p1 p1 p1 | p2 p2 |
        query_start_loc:  0    1          4       6
        seq_lens:         ctx0+1, ctx1+3, ctx2+2   (cached context + this step's queries)

    Query ``i`` of sequence ``s`` sits at absolute position ``seq_lens[s] - query_len[s] + i``
    and attends causally to every key at positions ``<=`` that (minus a sliding window).
    """

    num_tokens: int  # total query tokens this step (rows of q)
    num_seqs: int
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], cumulative query lengths, on device
    seq_lens: torch.Tensor  # int32 [num_seqs], context + this step's queries, on device
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], on device; pad with 0
    slot_mapping: torch.Tensor  # int64 [num_tokens], cache slot each new k/v goes to; -1 = skip
    max_query_len: int
    max_seq_len: int
    # Host copies, for kernels that loop over sequences on the CPU. Plain lists of ints.
    query_start_loc_host: list[int]
    seq_lens_host: list[int]


# ---------------------------------------------------------------------------------------------
# Protocols of what the hooks return. The registry checks results against these with
# ``isinstance`` and refuses (naming the plugin) an object that lacks a member.
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class AttentionKernel(Protocol):
    """A paged-attention implementation. Every kernel has the same three parts: a metadata type,
    ``build_metadata`` (the builder) and ``forward``.

    KV cache layout (shared by all backends): per layer, ``k_cache`` and ``v_cache`` each of
    shape ``[num_blocks, block_size, num_kv_heads, head_size]``. Token ``t`` of a sequence lives
    in block ``block_table[t // block_size]`` at offset ``t % block_size``; its *slot* is
    ``block_id * block_size + offset``. A slot of -1 in ``slot_mapping`` means "do not write".

    Capabilities are declared as class attributes, never discovered by trial:

    - ``name``: shown in logs and ``tessellm backends --verbose``.
    - ``supports_sliding_window``: False means the hook returns None for a spec with a window.
    - ``supports_graph_capture`` (optional, default False): ``build_metadata`` output can be
      reused across graph replays and ``forward`` does no host-device synchronisation.
    - ``fuses_rotary`` (optional, default False): ``forward`` also accepts the keyword
      arguments ``positions`` and ``cos_sin_cache`` and then applies the rotary embedding
      itself (below), saving the model a launch per layer. The model passes them only for
      NeoX-style rotary over the whole head; for any other rotary, and for every kernel that
      does not declare this, it rotates q and k first (``FusedOps.rotary_embedding``) and calls
      ``forward`` without them. Declaring it is safe on any tessellm: one that does not know
      the flag never passes the arguments.
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
        ``[num_tokens, num_heads, head_size]`` in q's dtype.

        Only for a kernel that declares ``fuses_rotary``, and only when the model passes them:
        keyword arguments ``positions`` (int ``[num_tokens]``, each token's absolute position)
        and ``cos_sin_cache`` (``[max_position, head_size]``, cos of each rotary frequency in
        the first half, sin in the second). Then ``q`` and ``k`` arrive unrotated and the kernel
        applies NeoX rotation (the two halves of each head, as ``FusedOps.rotary_embedding``
        does) to q and to k before k is written to the cache; attention uses the rotated q and
        keys. The caller reads neither ``q`` nor ``k`` afterwards: rotating q in place is
        fine, and k may stay unrotated. Rows with slot -1 (graph padding) must not fault; their
        output is ignored."""


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

    # Optional (not checked by the registry): ``linear(x, weight, bias=None)``, the dense product
    # ``x @ weight.T + bias`` for the model's unquantized linears and LM head, where the backend
    # has something faster than torch's for some shapes (the cuda backend: a GEMV at 1-2 rows).
    #
    # Optional: ``all_reduce_add_rms_norm(x, residual, weight, eps, tp)``, under tensor
    # parallelism: ``x`` is this rank's partial sum (a row-parallel layer's unreduced output),
    # ``tp`` its ``distributed.parallel_state.TensorParallel``; returns what
    # ``fused_add_rms_norm(tp.all_reduce(x), residual, weight, eps)`` returns, so a backend can
    # do the all-reduce, the residual add and the norm in one launch. Without it the model calls
    # those two (``layers/norm.py``).
    #
    # Optional: ``fused_moe(hidden, router_logits, w13, w2, top_k, scoring="softmax",
    # renormalize=True, w13_scale=None, w2_scale=None)``, a Mixture-of-Experts MLP for the MoE
    # families (Mixtral, Qwen2/3-MoE). ``hidden [T, H]``; ``router_logits [T, E]``; ``w13
    # [E, 2I, H]`` (per expert the gate rows, then the up rows); ``w2 [E, H, I]``. Routing, in
    # float32: ``scoring`` "softmax" (over all E) or "sigmoid" (per logit) scores, the top
    # ``top_k`` experts per token, divided by their sum when ``renormalize``. Returns ``[T, H]`` in
    # hidden's dtype: per token the routing-weighted sum of ``w2[e] @ silu_and_mul(w13[e] @ x)``.
    # Quantized experts: ``w13`` / ``w2`` in ``float8_e4m3fn`` with per-output-channel float32
    # scales ``w13_scale [E, 2I]`` / ``w2_scale [E, H]`` (``W ~= w * scale[:, None]``). Under
    # tensor parallelism each rank holds its slice of I and returns its partial sum (the model
    # sums it, as for a row-parallel layer). The oracle is ``backends/reference/moe.py``; the
    # conformance suite's ``test_moe.py`` checks an implementation against it. Without it the
    # model runs the reference loop; ``tessellm backends`` reports which backends provide it.


@runtime_checkable
class GraphRunner(Protocol):
    """Captures a fixed-shape step once per batch-size bucket and replays it.

    The engine (or a test) drives it like this::

        runner.capture(step, make_inputs)      # once, after the KV cache is allocated
        size = runner.padded_size(n)           # smallest captured bucket >= n, or None
        out = runner.run(make_inputs_like(size))   # same shapes as make_inputs(size)

    ``step(*inputs)`` is a pure function of its tensor inputs (the KV cache and weights are
    captured by closure); dim 0 of every input and of the output is the padded batch size.
    ``make_inputs(size)`` returns a tuple of tensors for that size (the runner may keep them as
    its static buffers). Padding values are the caller's job (slot -1, sequence length 0).
    ``run`` returns what ``step`` would return for those inputs; a runner that keeps static
    buffers copies the inputs in and may return a view of its static output, valid until the
    next ``run``.
    """

    name: str
    capture_sizes: tuple[int, ...]  # ascending batch-size buckets captured

    def capture(self, step: Callable[..., Any], make_inputs: Callable[[int], tuple]) -> None: ...

    def padded_size(self, num_tokens: int) -> Optional[int]: ...

    def run(self, inputs: Sequence[Any]) -> Any: ...


@runtime_checkable
class QuantMethod(Protocol):
    """How a linear layer stores and applies quantized weights.

    Life cycle: ``create_weights`` registers parameters on ``layer`` (a ``torch.nn.Module``);
    the loader fills them from the checkpoint, or ``quantize_dense`` fills them from a dense
    weight (on-the-fly quantization of an unquantized checkpoint, and what the conformance suite
    uses); then ``process_weights_after_loading`` repacks once; then ``apply`` per forward.
    """

    name: str

    def create_weights(self, layer, input_size: int, output_size: int, dtype) -> None: ...

    def quantize_dense(self, layer, weight) -> None:
        """Fill ``layer``'s parameters from a dense ``weight`` ``[output_size, input_size]``.
        May raise ``NotImplementedError`` for schemes that only load pre-quantized weights."""

    def process_weights_after_loading(self, layer) -> None: ...

    def apply(self, layer, x, bias=None):
        """``x @ W.T (+ bias)`` with the quantized ``W``; returns x's dtype."""


# The protocol each firstresult hook's return value must satisfy.
HOOK_RESULT_PROTOCOLS = {
    "tessellm_attention_kernel": AttentionKernel,
    "tessellm_fused_ops": FusedOps,
    "tessellm_graph_runner": GraphRunner,
    "tessellm_quant_method": QuantMethod,
}
# The pieces ``tessellm backends --verbose`` reports, by hook.
PIECES = {"attention": "tessellm_attention_kernel", "ops": "tessellm_fused_ops",
          "graph": "tessellm_graph_runner", "quant": "tessellm_quant_method"}


# ---------------------------------------------------------------------------------------------
# Hook specifications.
# ---------------------------------------------------------------------------------------------


class BackendHookSpec:
    """Every hook a plugin may implement. A plugin implements any subset; all are module-level
    functions marked ``@hookimpl`` (or methods of a registered object). An implementation may
    declare fewer arguments than the spec. A function named ``tessellm_*`` that is not a hook
    below, or a hook function not marked ``@hookimpl``, is refused at load time."""

    @hookspec
    def tessellm_register_backends(self, register: Callable[[Backend], None]) -> None:
        """Register the backends this plugin provides.

        When: once per process, when the registry first loads plugins (the engine core process,
        every worker process, and the CLI for ``tessellm backends``).
        ``register``: call it once per ``Backend``. Registering a name that another plugin
        already registered is an error naming both plugins.
        Return value: ignored. Must not touch the device or import heavy device libraries
        (``is_available`` is asked later, and only then may it probe the hardware).
        """

    @hookspec(firstresult=True)
    def tessellm_attention_kernel(self, backend: Backend, spec: AttentionSpec) -> Optional[AttentionKernel]:
        """Return the paged-attention kernel for ``backend`` and ``spec``, or None.

        When: once per model load (per distinct sliding window), in the process that runs the
        model (engine core or worker); also by ``tessellm backends --verbose`` and the
        conformance suite, possibly for a backend whose hardware is absent: constructing the
        kernel must not touch the device (allocate lazily in ``forward``).
        ``backend``: the selected backend; return None unless you provide a kernel for it.
        ``spec``: the attention shapes and dtypes of the model.
        Return value: the first non-None result wins. A plugin that overrides a backend it does
        not own marks its implementation ``@hookimpl(tryfirst=True)`` and returns None for specs
        it does not handle, so the owner's kernel serves those. Raise ``ValueError`` with one
        sentence for a spec the backend can never run (e.g. an unsupported head size).
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
        The runner's ``capture`` is called once; it may compile or record per bucket.
        """

    @hookspec(firstresult=True)
    def tessellm_quant_method(self, backend: Backend, spec: QuantSpec) -> Optional[QuantMethod]:
        """Return the linear method for quantization ``spec.scheme`` on ``backend``, or None.

        When: once per model load, before weights are created, in the process that runs the
        model. None from every plugin means the scheme is unsupported on this backend: the
        engine refuses it at start-up naming the backends that do support it.
        """
