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

History: 1 = the first published contract. 2 = ownership: a hook that answers for a backend
another plugin registered must be declared in ``TESSELLM_OVERRIDES`` (below), and tessellm
checks what kernels and ops return (``TESSELLM_VALIDATE_PLUGINS``). A version-1 plugin keeps
working unchanged unless it answered for another plugin's backend; then the registry refuses
that answer with one sentence saying to add ``TESSELLM_OVERRIDES``. 3 = ``tessellm_lora_ops``
(batched multi-LoRA shrink/expand, ``LoRAOps``); plugins of versions 1 and 2 keep working (the
engine falls back to the pure-torch reference for LoRA). 4 = attention logit soft-capping
(``AttentionSpec.logit_softcap``, the kernel's ``supports_logit_softcap``); plugins of versions
1 to 3 keep working for every model without it, and a soft-capped model (Gemma 2) is refused on
them at load with one sentence naming the option and the backend (their kernels do not declare
the flag, so the spec field they never read is never silently ignored). 5 = attention sinks
(``AttentionSpec.attention_sinks``, the kernel's ``supports_attention_sinks``, ``forward``'s
``sinks`` keyword); plugins of versions 1 to 4 keep working for every model without them, and a
model with sinks (gpt-oss) is refused on them at load in the same way. 6 = multi-head latent
attention (``AttentionSpec.mla_value_size``, the kernel's ``supports_mla``: DeepSeek-V2/V3 cache
one latent row per token, values are its leading dims); plugins of versions 1 to 5 keep working
for every model without it, and an MLA model is refused on them at load in the same way. 7 =
Mamba2 mixer ops (``FusedOps.mamba_conv1d`` / ``mamba_chunk_scan`` / ``mamba_state_update`` over
a ``MambaBatch``, declared by the ops' ``supports_mamba2``: Mamba2, Granite 4.0-H); plugins of
versions 1 to 6 keep working for every model without Mamba layers, and such a model is refused
on an ops object that does not declare the flag, at load, naming the backend.
8 = key limits (``AttentionSpec.prefill_key_limits``, the kernel's ``supports_key_limits``,
``AttentionBatch.key_limits``: a prefill row may see keys past its own position, up to a limit
of its own; Gemma 3's image tokens see their whole image); plugins of versions 1 to 7 keep
working for every model without it, and a model that needs it is refused on them at load in the
same way.
9 = the gated delta rule (``FusedOps.gated_delta_chunk`` / ``gated_delta_step`` over a
``MambaBatch``, with ``mamba_conv1d`` for the causal conv before them, declared by the ops'
``supports_gated_delta``: Qwen3-Next's gated DeltaNet layers); plugins of versions 1 to 8 keep
working for every model without such layers, and such a model is refused on an ops object that
does not declare the flag, at load, naming the backend.
10 = ``Backend.overlap_streams`` (optional: a second stream and events, ``OverlapStreams``, for
the decode micro-batch overlap, ``TESSELLM_DECODE_OVERLAP``); plugins of versions 1 to 9 keep
working (their backends run such steps' micro-batches on one stream).
11 = ``FusedOps.swap_blocks`` (optional: whole-block copies between the device KV cache and
the host tier of the prefix cache, ``--kv-offloading-size``); plugins of versions 1 to 10 keep
working (the engine copies with the pure-torch reference, ``backends/reference/kv_transfer.py``).
12 = expert parallelism: ``FusedOps.fused_moe`` / ``fused_experts`` take a keyword-only
``expert_map`` where the ops object declares ``fused_moe_expert_map = True``; plugins of
versions 1 to 11 keep working for everything else, and ``enable_expert_parallel`` is refused
on an ops object with its own ``fused_moe`` that does not declare the flag, at load, naming it.
13 = speculative decoding on models with recurrent states: ``MambaBatch.verifies`` (the
sequences that verify drafts, last in the step's rows) and the optional ``FusedOps`` ops
``mamba_conv1d_verify`` / ``mamba_state_update_verify`` / ``gated_delta_verify``, which keep the
state after each verified token in a slot of its own; plugins of versions 1 to 12 keep working
(the engine composes those ops from their one-token ops, ``reference/recurrent_verify.py``).
14 = ``LoRAOps.fused_experts_lora`` (optional: the experts of a MoE layer with each token's
adapter on every expert's gate/up/down projections, ``ExpertLoRA``); plugins of versions 1 to 13
keep working (the engine runs the pure-torch reference, ``backends/reference/moe_lora.py``).
15 = AWQ / GPTQ int4 MoE experts: ``FusedOps.fused_moe`` / ``fused_experts`` take keyword-only
``int4=True`` with ``w13_zeros`` / ``w2_zeros`` where the ops object declares ``fused_moe_int4 =
True``; plugins of versions 1 to 14 keep working (such experts run the pure-torch reference,
``backends/reference/moe.py``).

16 = captured verify steps on models with recurrent states (``FusedOps.recurrent_verify_graphs``,
optional: the ops object's own ``*_verify`` ops read only the batch's device tensors, so the
engine replays verify steps of such models from graphs); plugins of versions 1 to 15 keep
working (with their own verify ops, such steps run eagerly; without, the engine's composition
is captured).
17 = ``FusedOps.mamba_strided_inputs`` (optional): the ops' ``mamba_conv1d`` /
``mamba_state_update`` / ``mamba_chunk_scan`` (and their verify forms) take ``x`` and ``dt`` as
row-strided views of the mixer's projection (the last dim contiguous), sparing two copies a
layer and step; plugins of versions 1 to 16 keep working (their ops get contiguous copies).
18 = ``FusedOps.linear_add_rms_norm``, ``QuantOps.fp8_mm_add_rms_norm`` and
``QuantMethod.apply_add_rms_norm`` (optional): a product followed by the residual-add RMSNorm
in one call (batch-1 decode under ``TESSELLM_GEMV_NORM_EPILOGUE=1``); plugins of versions 1 to
17 keep working (the decoder runs the product, then the norm).
19 = ``FusedOps.gated_rms_norm`` (optional): the recurrent mixers' gated RMSNorm (Mamba2,
Granite 4.0-H, Bamba, Nemotron-H, Falcon-H1, Qwen3-Next's gated DeltaNet) in one op; plugins of
versions 1 to 18 keep working (the layers run the pure-torch reference,
``backends/reference/gated_norm.py``).
20 = GPTQ act-order (``desc_act``) int4 MoE experts: ``FusedOps.fused_moe`` / ``fused_experts``
take keyword-only ``w13_perm`` (int32 ``[E, H]``, each expert's input order) with ``int4=True``
where the ops object declares ``fused_moe_int4_act_order = True``; plugins of versions 1 to 19
keep working (such experts run the pure-torch reference, ``backends/reference/moe.py``).
21 = ``FusedOps.mamba_state_saves`` (optional): the ops' ``mamba_chunk_scan`` takes keyword-only
``snapshots`` (the layer's SSM snapshot pool) and keeps the states ``MambaBatch.state_saves``
ask for (recurrent-state prefix caching, saved inside a prefill step); plugins of versions 1
to 20 keep working (the layers run their scan once per piece between the saves,
``backends/reference/state_saves.py``).
22 = ``FusedOps.gated_delta_state_saves`` (optional): the ops' ``gated_delta_chunk`` takes
keyword-only ``snapshots`` (the layer's state snapshot pool) and keeps the states
``MambaBatch.state_saves`` ask for, as ``mamba_chunk_scan`` under API 21; plugins of versions 1
to 21 keep working (the layers run their ``gated_delta_chunk`` once per piece between the saves).
23 = ``FusedOps.mamba_conv_state_saves`` (optional): the ops' ``mamba_conv1d`` takes keyword-only
``snapshots`` (the layer's conv snapshot pool) and keeps the conv states
``MambaBatch.state_saves`` ask for (the Triton conv in its state launch: no copy per save);
plugins of versions 1 to 22 keep working (the layers copy those states from the conv's input
before calling their ``mamba_conv1d``).
24 = ``FusedOps.linear_add_rms_norm_fold`` / ``linear_rms_scaled``, ``QuantOps.
fp8_mm_add_rms_norm_fold`` / ``fp8_mm_rms_scaled`` and ``QuantMethod.apply_add_rms_norm_fold`` /
``apply_rms_scaled`` (optional pairs): a residual-add RMSNorm split between the product before
it and the product after it (batch-1 decode: ``TESSELLM_NORM_FOLD2``, else the backend's optional
``FusedOps.norm_fold_default``); plugins of versions 1 to 23 keep working (the decoder runs the
product, the norm, the product). The same version added ``QuantOps.prepare_int4`` (optional):
an AWQ / GPTQ weight's codes re-laid for the backend's kernels once at load.
25 = ``OverlapStreams.gemm_sm_carveout`` (optional): ``(sms) -> context manager`` in which the
backend's GEMMs queued on the current stream leave ``sms`` multiprocessors free, held while a
split decode step's layers are queued (``decode_overlap_sm_carveout``); plugins of versions 1
to 24 keep working (the carve-out is ignored with a warning).
26 = bitsandbytes 4-bit MoE experts: ``FusedOps.fused_moe`` / ``fused_experts`` take
keyword-only ``bnb4_code`` (the layer's 16-entry NF4 / FP4 table) with uint8 codes and float32
block absmaxes where the ops object declares ``fused_moe_bnb4 = True``; plugins of versions 1
to 25 keep working (the layer dequantizes the routed experts and calls their plain
``fused_experts``, ``layers/moe_bnb.py``).

Ownership
---------
A backend belongs to the plugin that registered it. A hook result for a backend owned by
another plugin is refused (``PluginError``) unless the answering plugin lists that backend's
name in ``TESSELLM_OVERRIDES`` (a tuple of backend names, set in its plugin module);
``tessellm backends`` shows declared overrides. Hooks should return None for backends they do
not serve: check ``backend.name`` first.

Checked calls
-------------
On each model load, the first calls of every ``AttentionKernel.forward`` and ``FusedOps`` op are
checked (shape, dtype, device, and a few rows against the pure-torch reference); a mismatch
raises one ``PluginError`` naming the plugin, the hook, what was expected and what came back.
After those first calls the plugin's own methods are called directly (no cost). With
``TESSELLM_VALIDATE_PLUGINS=1`` (the conformance suite sets it) every call is checked.

A backend on ``device_type="cpu"``
----------------------------------
The engine treats any backend whose ``device_type`` is "cpu" like the cpu backend: the model
runs in float32 unless ``--dtype`` says otherwise, and the KV cache gets
``TESSELLM_CPU_KV_CACHE_GB`` (default 4 GiB) instead of a share of ``memory_info``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import pluggy

if TYPE_CHECKING:
    import torch

PROJECT_NAME = "tessellm"
ENTRY_POINT_GROUP = "tessellm.backends"
TESSELLM_PLUGIN_API = 26
# The module attribute a plugin sets to the API version it needs (default: 1).
API_REQUIRED_ATTR = "TESSELLM_PLUGIN_API_REQUIRED"
# The module attribute listing backends (by name) this plugin may answer hooks for although
# another plugin registered them, e.g. ``TESSELLM_OVERRIDES = ("cpu",)``. Default: none.
OVERRIDES_ATTR = "TESSELLM_OVERRIDES"

# KV cache dtypes, the one list: the values of ``--kv-cache-dtype`` / ``AttentionSpec.
# kv_cache_dtype``. An attention kernel declares the ones it runs in its ``kv_cache_dtypes``
# attribute (default ("auto",)); that attribute is what the engine enforces.
KV_CACHE_DTYPES = {
    "auto": "the cache has the model's dtype",
    "fp8": "float8 e4m3 cache (the kernel picks its torch dtype via kv_cache_torch_dtype)",
    "fp8_e4m3": "an alias of fp8",
}

# ``Backend.capabilities`` keys. "enforced": the engine acts on it; "informative": shown by
# ``tessellm backends`` and read by the conformance suite to skip cases, never trusted for
# correctness (the pieces themselves are asked: the kernel's attributes, the hooks' answers).
CAPABILITIES = {
    "graph_capture": ("informative", "bool: the backend has a graph runner "
                      "(the engine asks tessellm_graph_runner)"),
    "quantization": ("informative", "list of schemes tessellm_quant_method answers for "
                     "(the engine asks the hook)"),
    "kv_cache_dtypes": ("informative", "list of KV_CACHE_DTYPES keys; the enforced list is the "
                        "attention kernel's kv_cache_dtypes attribute"),
    "sliding_window": ("informative", "bool; the enforced flag is the kernel's "
                       "supports_sliding_window"),
    "logit_softcap": ("informative", "bool; the enforced flag is the kernel's "
                      "supports_logit_softcap"),
    "attention_sinks": ("informative", "bool; the enforced flag is the kernel's "
                        "supports_attention_sinks"),
    "mla": ("informative", "bool: multi-head latent attention (AttentionSpec.mla_value_size); "
            "the enforced flag is the kernel's supports_mla"),
    "mamba2": ("informative", "bool: Mamba2 mixer ops (state-space models: Mamba2, Granite "
               "4.0-H); the enforced flag is the fused ops' supports_mamba2"),
    "gated_delta": ("informative", "bool: gated delta rule ops (gated DeltaNet linear attention: "
                    "Qwen3-Next); the enforced flag is the fused ops' supports_gated_delta"),
    "key_limits": ("informative", "bool: prefill rows that see keys past their position "
                   "(AttentionBatch.key_limits); the enforced flag is the kernel's "
                   "supports_key_limits"),
    "lora": ("informative", "bool: the backend has batched LoRA ops of its own (the engine asks "
             "tessellm_lora_ops; without them it runs the pure-torch reference)"),
    "emulation_env": ("enforced", "dict: environment variables an emulated run of the backend "
                      "needs, set before its kernels are imported (cuda, rocm: TRITON_INTERPRET=1, "
                      "Triton's interpreter on host tensors); emulate refuses to start without them"),
    "decode_overlap": ("informative", "bool: a second device stream for the decode micro-batch "
                       "overlap (--enable-decode-overlap); what the engine uses is "
                       "Backend.overlap_streams (and its OverlapStreams.gemm_sm_carveout)"),
}

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
    # "quantization": ["fp8"], "kv_cache_dtypes": ["auto"]}). Declared, not discovered; the
    # keys and which are enforced: CAPABILITIES above.
    capabilities: dict = field(default_factory=dict, hash=False, compare=False)
    # True for a copy made by ``tessellm.backends.emulation.emulated_backend``: this backend's
    # kernels on host tensors (``LLM(emulate=True)``, ``--emulate``); plugins never set it.
    emulated: bool = False
    # Optional: ``() -> OverlapStreams`` (below), a second stream of the device and events
    # between the two, for the decode micro-batch overlap (``TESSELLM_DECODE_OVERLAP``,
    # ``core/decode_overlap.py``). Called once per model runner, in the worker process, after
    # the device is current. None: such steps run their micro-batches one after another.
    overlap_streams: Optional[Callable[[], Any]] = field(default=None, hash=False, compare=False)

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
    # Attention logit soft-cap (Gemma 2: 50.0): every score becomes ``cap * tanh(score / cap)``
    # after the scale, before the mask and softmax. None: no cap. Served only by a kernel that
    # declares ``supports_logit_softcap`` (the engine refuses the model elsewhere).
    logit_softcap: Optional[float] = None
    # Attention sinks (gpt-oss): every query head has a learned logit that joins its softmax
    # denominator as a key with no value (``softmax(concat(scores, sink))`` without the sink's
    # column). The values differ per layer, so they come with each call: ``forward``'s
    # ``sinks`` keyword, float32 ``[num_heads]`` (this rank's heads). Served only by a kernel
    # that declares ``supports_attention_sinks`` (the engine refuses the model elsewhere).
    attention_sinks: bool = False
    # The engine's limits (None: unknown, e.g. a kernel built outside an engine): a kernel may
    # size workspaces from them once instead of for a guess. ``max_model_len``: the longest
    # sequence (a drafter's: plus its lookahead). ``max_num_seqs``: the most query rows of a
    # step whose sequences all have the same query length (decodes; with speculative decoding,
    # ``S * q`` rows of the captured verify steps, when more than the scheduler's max_num_seqs).
    max_model_len: Optional[int] = None
    max_num_seqs: Optional[int] = None
    # Multi-head latent attention (DeepSeek-V2/V3 MLA, absorbed form): the layer caches one
    # row per token, its latent ``[c_kv | k_pe]`` (``head_size`` wide, ``num_kv_heads`` 1), and
    # each value is the first ``mla_value_size`` dims of that row. ``forward`` then gets
    # ``v=None`` and ``v_cache=None`` (no value cache is allocated) and returns ``[num_tokens,
    # num_heads, mla_value_size]``. None: separate K and V caches. Served only by a kernel that
    # declares ``supports_mla`` (the engine refuses the model elsewhere).
    mla_value_size: Optional[int] = None
    # Key limits (Gemma 3's images): some prefill rows of a step may see keys past their own
    # position, up to ``AttentionBatch.key_limits`` (an image's tokens see the whole image;
    # every other row stays causal). Served only by a kernel that declares
    # ``supports_key_limits`` (the engine refuses the model elsewhere).
    prefill_key_limits: bool = False


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
    """One step's sequences, flattened: what ``AttentionKernel.build_metadata`` receives.

    Ordering: the first ``num_decodes`` sequences have exactly one query token (decodes); the
    prefill chunks (one or more query tokens, possibly with cached context before them: chunked
    prefill, prefix-cache hits) follow. Within a sequence, query rows are consecutive and in
    position order. Rows of ``q``/``k``/``v`` are in this same order.

    Picture for three sequences, the first a decode, the others prefill chunks::

        tokens (flat):   | d0 | p1 p1 p1 | p2 p2 |
        query_start_loc:  0    1          4       6
        seq_lens:         ctx0+1, ctx1+3, ctx2+2   (cached context + this step's queries)

    Query ``i`` of sequence ``s`` sits at absolute position ``seq_lens[s] - query_len[s] + i``
    and attends causally to every key at positions ``<=`` that (minus a sliding window).

    Every tensor is on the backend's device (``Backend.torch_device``); nothing is promised
    about contiguity beyond what ``torch.tensor``/``from_numpy(...).to(device)`` give (they
    are contiguous today). Two shapes of batch reach a kernel:

    - eager steps: exactly ``num_seqs`` rows, ``block_tables`` as wide as the longest sequence
      of this step needs, host copies filled;
    - graph-captured decode steps (only for a kernel whose backend has a graph runner): every
      sequence a decode, ``num_seqs`` = the padded bucket size, padding rows with slot -1 and
      ``seq_lens`` 0 (1 while capturing), ``block_tables`` ``ceil(max_model_len /
      block_size)`` wide, ``max_seq_len = max_model_len``, and the host copies **empty lists**
      (reading them would bake one step's values into the graph).
    """

    # Query tokens this step, i.e. rows of q/k/v and of slot_mapping (graph steps: padded).
    num_tokens: int
    # Sequences this step (graph steps: padded); rows of seq_lens and block_tables.
    num_seqs: int
    # The first num_decodes sequences have exactly one query token; 0 <= num_decodes <= num_seqs.
    num_decodes: int
    # int32 [num_seqs + 1]: query_start_loc[s] is sequence s's first row; [0] = 0 and
    # [num_seqs] = num_tokens, so query_len[s] = query_start_loc[s+1] - query_start_loc[s].
    query_start_loc: torch.Tensor
    # int32 [num_seqs]: cached context + this step's queries = keys sequence s attends over.
    # 0 for graph padding rows.
    seq_lens: torch.Tensor
    # int32 [num_seqs, max_blocks_per_seq]: row s lists sequence s's KV block ids in order
    # (token t of the sequence is in block block_tables[s, t // block_size]). Unused trailing
    # entries are 0, a real block id, so a kernel that reads past seq_lens[s] reads finite
    # (zero-initialised) cache; mask by seq_lens, never by the table.
    block_tables: torch.Tensor
    # int64 [num_tokens]: the cache slot (block_id * block_size + offset) row i's k/v is
    # written to; -1 means "do not write" (graph padding rows).
    slot_mapping: torch.Tensor
    max_query_len: int  # max over sequences of query_len (1 when every sequence is a decode)
    max_seq_len: int  # >= max(seq_lens); graph steps pass max_model_len (an upper bound)
    # Host copies of query_start_loc and seq_lens (plain lists of ints), for kernels that loop
    # over sequences on the CPU without a device sync. Empty lists in graph-captured steps.
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    # Only for a spec with ``prefill_key_limits``, only in eager steps that compute such rows
    # (else None, and every row is causal): int32 [num_tokens], the last key position row i
    # may see, in place of its own position. Always >= the row's position and < its
    # sequence's seq_len; equal to the position for decode rows (and for every row outside an
    # image), so a kernel may read it for prefill rows only. The sliding window stays relative
    # to the row's position (keys > position - window). Picture, one chunk of 7 rows at
    # positions 0..6 whose rows 2..4 are one image::
    #
    #     key_limits  [0 1 4 4 4 5 6]      row 2 sees keys 0..4 (causal would stop at 2)
    key_limits: Optional[torch.Tensor] = None
    key_limits_host: Optional[list[int]] = None  # the same values, a host list (or None)


@dataclass
class MambaBatch:
    """One step's sequences as a Mamba layer's ops see them (``FusedOps.mamba_*``): the same
    sequences and order as the step's ``AttentionBatch`` (decodes first), and per sequence the
    slot of the per-request recurrent state (conv and SSM state) it reads and writes::

        tokens (flat):   | d0 | d1 | p2 p2 p2 p2 | p3 p3 |
        query_start_loc:  0    1    2             6       8
        state_indices:    5    0    3             1         (slots of the state cache)
        num_decodes = 2: d0, d1 go through mamba_state_update, the rest through mamba_chunk_scan

    A slot holds the state after the sequence's computed tokens: zeros before a request's
    first token (the engine zeroes it), the state after chunk k when chunk k + 1 runs."""

    # int32 [num_seqs + 1], on the device: sequence s's rows are [qsl[s], qsl[s + 1]).
    query_start_loc: torch.Tensor
    # int32 [num_seqs], on the device: sequence s's state slot (distinct within a step).
    state_indices: torch.Tensor
    # The first num_decodes sequences have exactly one token (and their rows come first).
    num_decodes: int
    # Host copies (lists of ints) of the two tensors above. In a captured decode step
    # (``MambaStateCache.decode_batch``) the slots are not on the host: state_indices_host is
    # empty there, and an op's decode path (one token per sequence) must use state_indices.
    query_start_loc_host: list[int]
    state_indices_host: list[int]
    # The prefill sequences alone (query_start_loc from their first row, 0-based), or None
    # when every sequence is a decode; what a layer passes to mamba_chunk_scan.
    prefills: Optional["MambaBatch"] = None
    # Speculative decoding: the sequences that verify drafts (1 + k tokens each), or None. Their
    # rows come last, after every row this batch describes (``query_start_loc`` ends before
    # them); the verify batch's own ``query_start_loc`` counts from their first row. What a
    # layer passes to the ``*_verify`` ops, which leave the state after each token in a slot
    # of its own (``token_slots``) so the engine can keep the state after the accepted prefix::
    #
    #     rows:          | d0 | p1 p1 p1 | v2 v2 v2 v2 | v3 v3 |     (decodes, prefills, verifies)
    #     verifies:                        qsl [0, 4, 6], state_indices [7, 2]
    #     token_slots:                     [h h h 7 | h 2]          (the last token: its own slot)
    verifies: Optional["MambaBatch"] = None
    # Verify batches only: int32 [tokens] on the device, the slot that receives the state after
    # each token (a sequence's last token: its own slot, ``state_indices``; the others: spare
    # slots no other sequence of the step reads or writes), and the same as a host list.
    token_slots: Optional["torch.Tensor"] = None
    token_slots_host: list = field(default_factory=list)
    # Verify batches only, optional: per token position j, ``(rows, src, dst)`` int64 device
    # tensors over the sequences longer than j (the state before, from slot src; after, to
    # dst); built once per step, by the first op that runs the recurrence one position at a
    # time (``reference/recurrent_verify.positions``): None until then.
    positions: Optional[list] = None
    # Recurrent-state prefix caching (core/state_prefix.py): ``(sequence, offset, snapshot
    # slot)`` triples, the state after the sequence's first ``offset`` tokens of this step (0 <
    # offset < its length: a block boundary inside its prefill chunk) to keep in that slot of
    # the layer's snapshot pools, besides the state after its last token in its own slot.
    # Empty: none. Ops ignore it, but for ``mamba_chunk_scan`` / ``gated_delta_chunk`` /
    # ``mamba_conv1d`` given ``snapshots`` (where the ops declare ``mamba_state_saves`` /
    # ``gated_delta_state_saves`` / ``mamba_conv_state_saves``, plugin API 21 / 22 / 23).
    # Otherwise the layers take the conv
    # states from the conv's input before ``mamba_conv1d`` runs, and run a scan
    # (``mamba_chunk_scan``, ``gated_delta_chunk``) once per piece between the offsets,
    # copying the states between (``reference/state_saves.py``), with ``pieces`` the plan of
    # those calls (built once per step by the first layer, None until then; the pieces'
    # batches carry no saves).
    state_saves: list = field(default_factory=list)
    pieces: Optional[tuple] = None


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
    - ``supports_logit_softcap`` (optional, default False): ``forward`` applies the spec's
      ``logit_softcap`` (``cap * tanh(scale * q.k / cap)`` before the softmax; the oracle is
      ``backends/reference/attention.paged_attention``). For a spec with a cap the engine refuses
      the model at load, naming the option and the backend, unless the kernel it got declares
      this; a kernel that does not know the field is therefore never given a soft-capped model.
    - ``supports_attention_sinks`` (optional, default False): for a spec with
      ``attention_sinks``, ``forward`` takes the keyword argument ``sinks`` (float32
      ``[num_heads]``, one logit per query head, in natural-log units like ``scale * q.k``,
      neither scaled nor soft-capped) and each row's softmax denominator gains ``exp(sink)``;
      the output is ``sum_j p_j v_j`` with ``p = softmax(concat(scores, sink))[:-1]``
      (oracle: ``backends/reference/attention.paged_attention``'s ``sinks``). Refused at load
      like the soft-cap when the kernel does not declare it; ``sinks`` is passed only for such
      a spec, so a kernel that does not know it never receives it.
    - ``supports_mla`` (optional, default False): ``forward`` serves a spec with
      ``mla_value_size`` (multi-head latent attention): it writes ``k`` (the latent row) into
      ``k_cache`` only, attends with values = the first ``mla_value_size`` dims of each cached
      row, and returns ``[num_tokens, num_heads, mla_value_size]`` (the oracle is
      ``backends/reference/mla_attention.paged_mla_attention``). For an MLA spec the engine
      refuses the model at load, naming the option and the backend, unless the kernel it got
      declares this. An MLA kernel listing ``fp8`` in ``kv_cache_dtypes`` keeps float8 e4m3
      latent rows (its ``kv_cache_torch_dtype``) of ``row / k_scale`` saturated at the format's
      largest value, ``k_scale`` its float attribute (one scale for the cache, default 1.0);
      rows read back as ``fp8 * k_scale``, keys and values alike (the oracle's ``k_scale``).
    - ``supports_key_limits`` (optional, default False): for a spec with
      ``prefill_key_limits``, a batch whose ``key_limits`` is set is attended with row i seeing
      keys ``<= key_limits[i]`` instead of ``<=`` its position (the oracle is
      ``backends/reference/attention.paged_attention``'s ``key_limits``). Refused at load like
      the soft-cap when the kernel does not declare it.
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
    """Elementwise ops a layer asks the backend for. All take and return torch tensors.

    Exact semantics (``tessellm.backends.reference.ops.ReferenceOps`` is the oracle the
    conformance suite and the first-call checks compare against). Every op returns tensors of
    its input's shape, dtype and device unless said otherwise; inputs are contiguous, outputs
    need not be.

    An optional flag below speaks for the op(s) it describes (``kernels/op_flags.
    FUSED_OPS_FLAGS``): a subclass of ``ReferenceOps`` or ``TritonOps`` that defines one of
    them in its own body without setting the flag there gets it off (docs/plugins.md, 2.5).
    """

    def rms_norm(self, x, weight, eps: float):
        """x ``[T, hidden]`` (model dtype), weight ``[hidden]``. In this order: cast x to
        float32; ``x * rsqrt(mean(x**2, -1) + eps)``; cast back to x's dtype; multiply by
        ``weight`` (in x's dtype). Returns a new tensor; x is not modified."""

    def fused_add_rms_norm(self, x, residual, weight, eps: float):
        """Returns ``(rms_norm(x + residual), x + residual)``; the sum is formed in x's dtype
        (rounded once) and both results have x's shape and dtype. May update ``x`` and
        ``residual`` in place (the caller reads neither afterwards)."""

    def rotary_embedding(self, positions, q, k, cos_sin_cache, head_size: int):
        """NeoX-style rotation of q ``[T, H*D]`` and k ``[T, KVH*D]`` (``D = head_size``) at
        int64 ``positions [T]``; returns ``(q, k)`` (may be rotated in place).

        ``cos_sin_cache`` is float32 ``[max_position, R]``: cos of each of the R/2 rotary
        frequencies in the first half, sin in the second. ``R`` is the rotary width: ``R == D``
        rotates the whole head; ``R < D`` (partial rotary) rotates only the first R dims of each
        head and leaves dims ``R..D`` unchanged. Within the rotated part, with ``x1, x2`` its
        two halves and cos/sin cast to q's dtype first: ``(x1*cos - x2*sin, x2*cos + x1*sin)``."""

    def silu_and_mul(self, x):
        """x ``[T, 2d]`` -> ``[T, d]``: ``silu(x[..., :d]) * x[..., d:]`` in x's dtype."""

    # Optional (not checked by the registry): ``linear(x, weight, bias=None)``, the dense product
    # ``x @ weight.T + bias`` for the model's unquantized linears and LM head, where the backend
    # has something faster than torch's for some shapes (the cuda backend: a GEMV at 1-2 rows).
    #
    # Optional: ``linear_silu_and_mul(x, weight, bias=None)``, ``silu_and_mul(linear(x, weight,
    # bias))`` for a stacked ``[gate; up]`` weight ``[2I, K]`` (``[M, 2I]`` -> ``[M, I]``), so the
    # activation can run in the GEMV's epilogue: the MLP calls it at 1-2 rows (decode) for a
    # dense gate_up without LoRA (``layers.linear.fused_silu_and_mul``). The oracle is
    # ``backends/reference/ops.linear_silu_and_mul``. Quantized layers: ``QuantMethod``'s
    # optional ``apply_silu_and_mul``.
    #
    # Optional (plugin API 18): ``linear_add_rms_norm(x, weight, residual, norm_weight, eps,
    # bias=None)``, ``fused_add_rms_norm(linear(x, weight, bias), residual, norm_weight, eps)``
    # -> ``(normed, residual)`` (the residual may be updated in place, as ``fused_add_rms_norm``
    # may), so the norm after o_proj or down_proj can run in the GEMV's epilogue: the decoder
    # asks for it at one row under ``TESSELLM_GEMV_NORM_EPILOGUE=1`` (``layers.linear.
    # fused_linear_add_rms_norm``). The oracle is ``backends/reference/ops.linear_add_rms_norm``.
    # Quantized layers: ``QuantMethod``'s optional ``apply_add_rms_norm``.
    #
    # Optional, a pair (plugin API 24): ``linear_add_rms_norm_fold(x, weight, residual,
    # norm_weight, bias=None)`` -> ``(xg, sumsq, residual)``: with ``y = x @ weight.T + bias``
    # rounded to x's dtype and ``h = y + residual`` rounded to the residual's (the new residual,
    # returned; updated in place where it can be), ``xg = round(h * norm_weight)`` in x's dtype
    # and ``sumsq`` float32 1-D partial sums whose total is ``sum(h^2)`` (a power-of-two count;
    # zeros may pad it); and ``linear_rms_scaled(x, weight, sumsq, eps, bias=None,
    # silu_and_mul=False)``: ``(x @ weight.T) * rsqrt(sum(sumsq) / K + eps) + bias`` rounded to
    # x's dtype, then ``silu_and_mul`` for a stacked ``[gate; up]`` weight if asked. Together the
    # RMS-normed ``h`` times the next weight with no norm launch between (the cuda backend: the
    # one-row GEMVs' epilogues, ``kernels/gemm/norm_fold.py``); the decoder asks at one row where
    # ``models.decoder.norm_fold2_on`` says (``TESSELLM_NORM_FOLD2``, else the optional attribute
    # ``norm_fold_default``; ``layers.linear.fold_norm_out`` / ``fold_norm_in``). Oracles:
    # ``backends/reference/ops.linear_add_rms_norm_fold`` / ``linear_rms_scaled``. Quantized
    # layers: ``QuantMethod``'s optional ``apply_add_rms_norm_fold`` / ``apply_rms_scaled``.
    #
    # Optional, the fp8 activation fold (asked unless ``TESSELLM_FP8_ACT_FOLD=0``, for the
    # input of an fp8 linear on its W8A8 path, ``layers.linear.fp8_input_dtype``):
    # ``rms_norm_fp8(x, weight, eps, fp8_dtype)``, ``fused_add_rms_norm_fp8(x, residual, weight,
    # eps, fp8_dtype)`` and ``silu_and_mul_fp8(x, fp8_dtype)``: the op's output (2-D, rounded to
    # the dtype the plain op returns) quantized per token, returned as a
    # ``quantization.packed.Fp8Activation`` (``qx [M, K]`` in ``fp8_dtype``, ``scales [M, 1]``
    # float32 ``= max(max|row|, 1e-12) / finfo(fp8_dtype).max``, ``dtype``) in place of the
    # tensor; the add variant returns ``(Fp8Activation, x + residual)``. A backend offers the
    # norms as a pair. Oracles: ``backends/reference/ops.rms_norm_fp8`` and its neighbours; the
    # consumer side is ``QuantOps``' optional ``fp8_mm_prequantized`` (``quantization/base.py``).
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
    # Variant (gpt-oss), only where the ops object lists the activation's kind in its
    # ``fused_moe_activations`` attribute (default ("silu",): never passed these): keyword-only
    # ``activation`` (``reference.moe.ExpertActivation``, "swiglu_oai": the clamped SwiGLU with
    # its ``alpha`` and ``limit``), ``w13_bias [E, 2I]`` and ``w2_bias [E, H]`` added after each
    # product (the down bias before the routing weight); conformance case
    # ``test_fused_moe_clamped_swiglu_with_biases``. Kind "relu2" (Nemotron-H's ungated
    # experts): ``w13 [E, I, H]`` holds the up rows alone and the expert is
    # ``w2[e] @ relu(w13[e] @ x) ** 2``; conformance case ``test_fused_moe_ungated_relu2``.
    # Variant (block-wise fp8 experts: Qwen3-MoE-FP8, DeepSeek-V3), only where the ops object
    # sets ``fused_moe_block_fp8 = True`` (else the model runs the reference loop for them):
    # keyword-only ``block_shape=(bn, bk)`` with e4m3 ``w13`` / ``w2`` and float32 block scales
    # ``w13_scale [E, 2I/bn, ceil(H/bk)]`` / ``w2_scale [E, ceil(H/bn), ceil(I/bk)]``
    # (``W ~= w * scale[n // bn, k // bk]``; ``quantization/fp8_block.py``), for ``fused_moe``
    # and ``fused_experts`` alike; conformance ``test_fused_moe_block_fp8_experts``.
    # Variant (expert parallelism, ``enable_expert_parallel``), only where the ops object sets
    # ``fused_moe_expert_map = True`` (else the engine refuses expert parallelism at load):
    # keyword-only ``expert_map``, an int32 tensor ``[E_global]`` mapping each global expert id
    # to this rank's local index or -1. ``router_logits`` (or ``topk_ids``) cover all E_global
    # experts; ``w13`` / ``w2`` and their scales hold only this rank's experts, whole (I not
    # sliced). Routing runs over all experts as before; a (token, slot) pair whose expert maps
    # to -1 contributes nothing, so the result is this rank's partial sum over its experts (the
    # model sums the ranks'). For ``fused_moe`` and ``fused_experts`` alike, combined with any
    # variant above; conformance ``test_fused_moe_expert_map``.
    # Variant (AWQ / GPTQ int4 experts, W4A16), only where the ops object sets
    # ``fused_moe_int4 = True`` (plugin API 15; else the model runs the reference loop for
    # them): keyword-only ``int4=True`` with int32 ``w13 [E, 2I, H/8]`` / ``w2 [E, H, I/8]``
    # (each row's inputs packed 8 codes a word, low nibble first), group scales ``w13_scale
    # [E, 2I, H/g]`` / ``w2_scale [E, H, I/g]`` (float16 or float32; g = K / G, each projection
    # its own) and keyword-only ``w13_zeros`` / ``w2_zeros``, uint8 zero codes of the scales'
    # shapes or None (zero 8: symmetric GPTQ): ``W = (q - zero) * scale`` in float32, rounded
    # to hidden's dtype (``reference/moe.dequantize_int4``). For ``fused_moe`` and
    # ``fused_experts`` alike, with ``expert_map``; conformance ``test_fused_moe_int4_experts``.
    # GPTQ act-order int4 experts, only where the ops object also sets
    # ``fused_moe_int4_act_order = True`` (plugin API 20): keyword-only ``w13_perm``, int32
    # ``[E, H]``: expert e's w13 inputs are stored in the order ``w13_perm[e]`` (groups
    # contiguous), so its gate / up rows multiply ``hidden[t, w13_perm[e]]`` (the down
    # projection's order is folded into w13's rows at load); conformance
    # ``test_fused_moe_int4_act_order``.
    # Variant (bitsandbytes 4-bit experts), only where the ops object sets ``fused_moe_bnb4 =
    # True`` (plugin API 26; else the layer dequantizes the routed experts and passes them
    # dense): keyword-only ``bnb4_code`` (float32 ``[16]``, the layer's NF4 or FP4 table) with
    # uint8 ``w13 [E, 2I, H/2]`` / ``w2 [E, H, I/2]`` (two codes a byte along the inputs, high
    # nibble first) and float32 absmaxes ``w13_scale [E, 2I, H/bs]`` / ``w2_scale [E, H,
    # I/bs]``, one per block of bs inputs of a row: ``W = code[q] * absmax`` in float32,
    # rounded to hidden's dtype (``reference/moe.dequantize_bnb4_experts``). For ``fused_moe``
    # and ``fused_experts`` alike, with ``expert_map``; conformance
    # ``test_fused_moe_bnb4_experts``.
    #
    # Mamba2 mixer ops, all three together where the ops object declares ``supports_mamba2 =
    # True`` (a model with Mamba layers is refused at load otherwise). Oracles and exact
    # semantics: ``backends/reference/mamba.py``; conformance ``test_mamba.py``. ``batch`` is a
    # ``MambaBatch``; states live in slots (``conv_state [slots, C, K-1]``, ``ssm_state [slots,
    # H, P, N]``), read and written in place at ``batch.state_indices``. Token inputs B and C
    # (and x after the conv) are views of the conv's output: the last dim contiguous, rows
    # strided. Optional (plugin API 17): ``mamba_strided_inputs = True`` declares that the ops
    # also take the conv's input ``x`` and ``dt`` as such views of the mixer's projection;
    # without it they get contiguous copies.
    # ``mamba_conv1d(x [T, C], weight [C, K], bias [C] | None, conv_state, batch, activation)``:
    # each sequence's depthwise causal conv continuing from its state (SiLU when activation is
    # "silu"), ``[T, C]`` out. ``mamba_chunk_scan(x [T, H, P], dt [T, H], A [H], B [T, G, N],
    # C [T, G, N], D [H], dt_bias [H], ssm_state, batch, chunk_size, dt_limit)``: the SSD scan
    # of each sequence (``dt`` raw: ``clamp(softplus(dt + dt_bias), *dt_limit)`` is the step),
    # ``[T, H, P]`` out. ``mamba_state_update(x [S, H, P], dt [S, H], A, B [S, G, N], C, D,
    # dt_bias, ssm_state, state_indices [S], dt_limit)``: one token per sequence.
    # Optional (plugin API 21): ``mamba_state_saves = True`` declares that ``mamba_chunk_scan``
    # takes keyword-only ``snapshots [S, H, P, N]`` and, for each ``(sequence, offset, slot)``
    # of ``batch.state_saves``, writes the state after the sequence's first ``offset`` tokens
    # to ``snapshots[slot]`` (in its dtype); the same outputs and final states as without.
    # Oracle: ``reference/state_saves.run_with_saves`` over the reference scan; conformance
    # ``test_mamba_scan_keeps_states_inside_the_step``.
    # Optional (plugin API 23): ``mamba_conv_state_saves = True`` declares that ``mamba_conv1d``
    # takes keyword-only ``snapshots [S, C, K - 1]`` and, for each ``(sequence, offset, slot)``
    # of ``batch.state_saves``, writes the conv state after the sequence's first ``offset``
    # tokens (the K - 1 inputs before that token, older state columns first where ``offset <
    # K - 1``) to ``snapshots[slot]`` (in its dtype); the same outputs and final states as
    # without, and without ``snapshots`` the saves are ignored. The layers pass it for the
    # gated DeltaNet's conv too. Oracle: ``reference/state_saves.save_conv_states`` before the
    # reference conv; conformance ``test_mamba_conv_keeps_states_inside_the_step``.
    #
    # Optional (plugin API 19): ``gated_rms_norm(y [T, C], z [T, C], weight, group_size, eps,
    # mode)``, the gated RMSNorm after the recurrent mixers (Mamba2's ``MambaRMSNormGated``,
    # Falcon-H1's, Qwen3-Next's): ``y`` normed per group of ``group_size`` channels, gated by
    # ``silu(z)``; ``mode`` "gate_then_norm" (``weight * round(norm(y * silu(z)))``),
    # "gate_then_norm_float32" (``round(weight * norm(y * silu(z)))``: Falcon-H1 without
    # ``mamba_norm_before_gate``), "norm_then_gate" (``round(weight * norm(y) * silu(z))``,
    # float32 throughout) or "norm_round_then_gate" (``round(silu(z) * round(weight *
    # round(norm(y))))``): all four (``reference/gated_norm.GATED_NORM_MODES``); ``weight``
    # ``[C]`` or ``[group_size]`` (shared by the groups), in y's dtype; ``z`` may be a column view
    # (rows strided, the last dim contiguous). Returns y's shape and dtype. Oracle and exact
    # semantics: ``backends/reference/gated_norm.py``; conformance ``test_gated_rms_norm``.
    # Without it the layers run that reference (torch ops).
    #
    # Gated delta rule ops (gated DeltaNet linear attention: Qwen3-Next), both together where
    # the ops object declares ``supports_gated_delta = True``, beside ``mamba_conv1d`` (the
    # causal conv before them; a model with such layers is refused at load otherwise). Oracles
    # and exact semantics: ``backends/reference/gated_delta.py``; conformance
    # ``test_gated_delta.py``. States live in slots (``state [slots, Hv, K, V]``), read and
    # written in place: ``gated_delta_chunk(q [T, Hk, K], k [T, Hk, K], v [T, Hv, V], g [T, Hv],
    # beta [T, Hv], state, batch, scale)``: each prefill sequence of ``batch`` (a
    # ``MambaBatch``) continuing from its state; ``gated_delta_step(q [S, Hk, K], k, v [S, Hv,
    # V], g [S, Hv], beta, state, state_indices [S], scale)``: one token per sequence. Both
    # L2-normalize q and k per head (``x * rsqrt(sum(x^2) + 1e-6)``) and scale q by ``scale``;
    # ``g`` is the float32 log decay (<= 0), ``beta`` the write strength; value head h reads key
    # head ``h // (Hv / Hk)``; ``[*, Hv, V]`` out in v's dtype.
    # Optional (plugin API 22): ``gated_delta_state_saves = True`` declares that
    # ``gated_delta_chunk`` takes keyword-only ``snapshots [S, Hv, K, V]`` and writes the state
    # after each ``batch.state_saves`` offset to ``snapshots[slot]`` (in its dtype), as
    # ``mamba_chunk_scan`` under ``mamba_state_saves``; the same outputs and final states as
    # without. Oracle: ``reference/state_saves.run_with_saves`` over the reference; conformance
    # ``test_gated_delta_keeps_states_inside_the_step``.
    #
    # Optional, speculative decoding on these models: ``mamba_conv1d_verify(x, weight, bias,
    # conv_state, batch, activation)``, ``mamba_state_update_verify(x, dt, A, B, C, D, dt_bias,
    # ssm_state, batch, dt_limit)`` and ``gated_delta_verify(q, k, v, g, beta, state, batch,
    # scale)``: the same functions as ``mamba_conv1d`` / ``mamba_state_update`` /
    # ``gated_delta_step`` over the sequences of a verify batch (``MambaBatch.verifies``: each
    # sequence a sampled token and its drafts), each sequence starting from the state in its
    # slot (``state_indices``) and leaving the state after its token ``t`` in slot
    # ``token_slots[t]`` (its last token's: its own slot; read the start state before writing
    # any). Oracles: ``backends/reference/recurrent_verify.py``; conformance
    # ``test_recurrent_verify.py``. Without them the engine composes each from the ops object's
    # own one-token op (``mamba_state_update``, ``gated_delta_step``; the conv in pure torch),
    # one token position at a time.
    #
    # Optional (plugin API 16): ``recurrent_verify_graphs = True`` declares that the ops' own
    # verify ops may run in a captured verify step (``MambaStateCache.verify_batch``): every
    # sequence has the same length, ``query_start_loc_host`` is set but ``state_indices_host``
    # and ``token_slots_host`` are empty and ``positions`` None (read the device tensors), and
    # padding sequences share the scratch slot as their state and every token's slot (what
    # lands there is never read back). Without the flag an ops object with its own verify ops
    # runs verify steps eagerly; one without them has the engine's composition captured.
    #
    # Optional: ``swap_blocks(src, dst, block_mapping)``, the host KV tier's copies
    # (``--kv-offloading-size``, ``core/kv_offload.py``): ``dst[d] = src[s]`` for each ``(s, d)``
    # int pair of ``block_mapping``, in order. ``src`` and ``dst`` are block-major caches (dim 0
    # the block; the same trailing shape and dtype, fp8 included): one is the device's cache of
    # one layer, the other a host buffer of the same layout (pinned where the device's runtime
    # pins), either way round. Called in the worker before a step's forward, once per cache
    # tensor, host chunk and phase of stores or loads (``core/host_kv_buffer.py``: a phase's
    # blocks in one mapping), on one of the tier's two side streams where the device has
    # streams. The copies must be ordered on the current stream (whichever it is: never
    # assume the compute stream) before any work queued after the call (a later step's forward
    # reads what a load wrote; a later store may reuse a host block a load read); the host may
    # go on before they finish (the host tier never reads its buffer on the host). A KV
    # connector (``--kv-transfer-config``, ``tessellm/kv_transfer``) also calls it with
    # short-lived host buffers (pinned where the device pins, else pageable): before the
    # forward to load, after it to save; it then waits
    # for an event recorded on the current stream after the call (or ``synchronize()``)
    # before the host reads or frees such a buffer. Returns None. Oracle and default:
    # ``backends/reference/kv_transfer.swap_blocks`` (a gather or scatter by index on the
    # device, a slice copy per run of consecutive host slots);
    # conformance ``test_kv_transfer.py``.
    #
    # Optional: ``fused_experts(hidden, topk_weights, topk_ids, w13, w2, w13_scale=None,
    # w2_scale=None)``, ``fused_moe`` with the routing done by the model (DeepSeek's grouped
    # top-k, ``models/moe_routing.py``): ``topk_weights`` float32 and ``topk_ids`` int ``[T, k]``,
    # each weight multiplying its expert's output as given (no renormalization). Oracle:
    # ``backends/reference/moe.fused_experts_reference``; conformance ``test_moe.py``. Without it
    # the model runs that reference loop.


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

    Optional: ``release()`` drops what ``capture`` made (graphs, their memory pool); sleep mode
    calls it before the weights and KV cache move (``core/runner_sleep.py``) and calls
    ``capture`` again after they are back. Without it the old graphs are kept until the new
    capture replaces them (never replayed in between).

    Optional: ``static_outputs = True`` says the runner keeps each captured step's output alive
    as a static buffer (device graphs do). The engine's steps then write their logits into one
    buffer shared by every graph, the decode and verify runners' alike, and return a view of
    its first rows (``core/runner_graphs.py``): one ``[largest size, vocab]`` buffer instead of
    one per graph, and the engine's memory reserve counts it once. Without it each step
    returns logits of its own.
    """

    name: str
    capture_sizes: tuple[int, ...]  # ascending batch-size buckets captured

    def capture(self, step: Callable[..., Any], make_inputs: Callable[[int], tuple]) -> None: ...

    def padded_size(self, num_tokens: int) -> Optional[int]: ...

    def run(self, inputs: Sequence[Any]) -> Any: ...


class OverlapStreams(Protocol):
    """Two streams of one device, for work the engine wants to overlap (the decode micro-batch
    overlap: one micro-batch's attention beside the other's GEMMs, ``models/micro_batches.py``).

    "The current stream" is whatever stream the engine is queuing on (a graph runner's capture
    stream while it captures); the side stream is the object's own. Every use is a fork and a
    join, so a CUDA graph capture on the current stream records the side work in the graph::

        ready = streams.record()          # event after the work queued so far
        with streams.side(ready):         # side stream: waits for ready, then this work
            out = attention(...)
            done = streams.record()       # event after the side work
        ...                               # current stream: other work, overlapping
        streams.wait(done)                # current stream waits before it reads ``out``

    Nothing ever blocks the host. A tensor one stream made and the other reads must be kept
    referenced until the reader's work has been waited for by the maker's stream (the caller's
    job). ``backends/reference/streams.py`` is the one-stream version (events are None).

    Optional (plugin API 25): ``gemm_sm_carveout``, ``(sms: int) -> context manager``, or None
    (absent: the same). While the engine holds the scope (it enters it around the queuing, or
    graph capture, of a split decode step's layers, in the worker process, on the current
    stream) the backend's GEMMs leave ``sms`` multiprocessors free, so the side stream's
    attention is never queued behind a GEMM grid that holds every multiprocessor (the cuda
    backend: cuBLASLt's SM count target, ``backends/cuda/streams.py``). Calling it with a value
    the device cannot take raises ``ValueError`` naming the range; calling it does no work until
    the scope is entered, and leaving the scope restores what was set before. Conformance:
    ``testing/conformance/test_overlap_streams.py`` (both).
    """

    def record(self) -> Any: ...

    def side(self, after: Any) -> Any: ...

    def wait(self, event: Any) -> None: ...


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

    # Optional: ``apply_silu_and_mul(layer, x, bias=None)``, ``silu_and_mul(apply(layer, x,
    # bias))`` for a stacked ``[gate; up]`` layer in one product, or None where the method cannot
    # for this layer (the caller then runs ``apply`` and the activation). The MLP asks for it at
    # 1-2 rows (decode). ``quantization.base.QuantLinearMethod`` serves it through its
    # ``QuantOps``' optional ``fp8_mm_silu_and_mul``.
    #
    # Optional (plugin API 18): ``apply_add_rms_norm(layer, x, residual, norm_weight, eps,
    # bias=None)``, ``fused_add_rms_norm(apply(layer, x, bias), residual, norm_weight, eps)`` ->
    # ``(normed, residual)`` in one product, or None where the method cannot for this layer.
    # ``quantization.base.QuantLinearMethod`` serves it through its ``QuantOps``' optional
    # ``fp8_mm_add_rms_norm``.
    #
    # Optional, a pair (plugin API 24): ``apply_add_rms_norm_fold(layer, x, residual,
    # norm_weight, bias=None)`` and ``apply_rms_scaled(layer, x, sumsq, eps, bias=None,
    # silu_and_mul=False)``, ``FusedOps.linear_add_rms_norm_fold`` / ``linear_rms_scaled`` on
    # the layer's product, or None where the method cannot for this layer.
    # ``QuantLinearMethod`` serves them through its ``QuantOps``' optional
    # ``fp8_mm_add_rms_norm_fold`` / ``fp8_mm_rms_scaled``.
    #
    # Optional, the fp8 activation fold: ``prequantized_dtype(layer, rows)``, the fp8 dtype in
    # which ``layer`` takes its input already quantized per token at ``rows`` rows, or None (it
    # takes the model-dtype tensor); and ``apply_prequantized(layer, xa, bias=None)``, ``apply``
    # for such an input (a ``quantization.packed.Fp8Activation``), in ``xa.dtype``.
    # ``QuantLinearMethod`` serves them through its ``QuantOps``' optional
    # ``fp8_mm_prequantized`` / ``fp8_w8a8_rows`` (a layer of one fp8 segment on the W8A8 path).


# ---------------------------------------------------------------------------------------------
# Logits ops (structured output). Self-contained: its spec, protocol and result entry.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitsOpsSpec:
    """What the sampler's logits look like."""

    dtype: Any = None  # torch dtype of the logits the ops receive (float32 in practice)


@runtime_checkable
class LogitsOps(Protocol):
    """Ops on the ``[num_rows, vocab]`` logits between the LM head and the sampler.

    ``apply_token_bitmask(logits, bitmask, indices=None)``: structured output's token mask, in
    place, for the whole batch in one launch. ``bitmask`` is int32 ``[num_masks, ceil(vocab /
    32)]`` on the logits' device: bit ``t % 32`` of word ``t // 32`` of a row is 1 when token
    ``t`` is allowed; every disallowed token's logit becomes ``-inf``, allowed ones are left
    untouched (bit-exact). Mask row ``i`` applies to logits row ``indices[i]`` (int64
    ``[num_masks]``) or, without ``indices``, to logits row ``i``. Returns None. A backend that
    does not provide it gets ``tessellm.backends.reference.logits.ReferenceLogitsOps``.

    Optional (not part of the protocol check): ``argmax(x, divisor=None)``, the sampler's
    reduction: int64 ``[rows]`` equal to ``(x / divisor).argmax(-1)`` (``x.argmax(-1)`` without
    ``divisor``) for 2-D ``x`` with contiguous rows, ties to the lowest index, as ``torch.argmax``.
    Greedy rows and the exponential race of random sampling go through it; without it the sampler
    uses torch (``tessellm.core.sampler.torch_argmax``). The Triton one is
    ``tessellm.kernels.sampling.argmax``.
    """

    def apply_token_bitmask(self, logits, bitmask, indices=None) -> None: ...


# ---------------------------------------------------------------------------------------------
# LoRA ops (multi-LoRA serving). Self-contained: its spec, protocol and result entry.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAOpsSpec:
    """How the engine stores its adapters: every slot's matrices stacked in fixed-size tensors."""

    dtype: Any  # torch dtype of the activations and of the stacked A/B weights
    max_loras: int  # S: adapter slots on the device (dim 0 of every stacked A/B tensor)
    max_rank: int  # R: every adapter's rank, zero-padded to it
    device: Any = None  # torch device the tensors live on; None: the backend's default


@runtime_checkable
class LoRAOps(Protocol):
    """Batched LoRA over a mixed batch: each token row may use a different adapter (SGMV/BGMV).

    A LoRA linear computes ``y = x W^T + scaling * (x A^T) B^T``; the engine runs the base
    product itself and asks these ops for the low-rank part, one launch per projection for the
    whole batch. Adapters live in *slots*: ``lora_a [S, R, K]`` and ``lora_b [S, N, R]`` hold slot
    ``s``'s matrices (rank zero-padded to ``R``; a slot with no adapter is all zeros). A row's
    slot is ``token_slots[t]``; -1 means "no adapter" (the row gets nothing added). Per step::

        meta = ops.prepare(token_slots, S)               # once, shared by every layer
        ops.shrink(x, lora_a, meta, buf)                 # buf [T, R'] float32
        ops.expand(buf[:, :R], lora_b, meta, scaling, y, out_offset=0)   # y += ...

    Exact semantics (``tessellm.backends.reference.lora.ReferenceLoRAOps`` is the oracle):

    - ``prepare(token_slots, num_slots)``: int32 ``[T]`` slots in ``[-1, num_slots)``; returns
      whatever ``shrink``/``expand`` need (opaque to the engine, passed back unchanged). With
      ``supports_graph_capture`` it does no host synchronisation and its result's tensors may
      be captured in a CUDA graph and refilled by the next ``prepare`` of the same ``T``.
    - ``shrink(x, lora_a, meta, out)``: ``x [T, K]`` (spec dtype), ``lora_a [S, R', K]``,
      ``out`` float32 ``[T, R']``. Writes ``out[t] = lora_a[slot[t]] @ x[t]`` (products summed in
      float32) for rows with a slot and 0 for rows without. The engine stacks a fused
      projection's A matrices (q/k/v, gate/up) as ``[S, n * R, K]``: one shrink for all of them.
    - ``expand(buf, lora_b, meta, scaling, out, out_offset)``: ``buf`` float32 ``[T, R']`` (may
      be a column slice of shrink's ``out``: rows strided), ``lora_b [S, N, R']``, ``scaling``
      float32 ``[S]``, ``out [T, N_total]`` (spec dtype, ``out_offset + N <= N_total``). In
      place: ``out[t, off:off + N] += scaling[slot[t]] * (lora_b[slot[t]] @ buf[t])``, the sum
      formed in float32 and rounded once to out's dtype, for rows with a slot; other rows and
      columns are untouched.
    - ``expand_slices(buf, lora_bs, meta, scaling, out, offsets)``: a fused projection's slices
      in one call (one launch on Triton backends): ``buf [T, n * R']``, ``lora_bs`` a sequence
      of ``n`` (1 to 3) ``[S, N_i, R']`` tensors, ``offsets`` ``n`` ints; equal to ``expand(
      buf[:, i*R':(i+1)*R'], lora_bs[i], meta, scaling, out, offsets[i])`` for each ``i``.

    Both return None. Inputs are on the spec's device; ``x``, ``lora_a``, ``lora_b`` have a
    contiguous last dim (``buf`` and ``out`` may be column slices). Optional attribute
    ``supports_graph_capture`` (default False): all three calls run without host
    synchronisation, so a decode step with LoRA can be captured (a subclass of
    ``TritonLoRAOps`` with one of these ops, ``expand_slices`` or ``fused_experts_lora`` of its
    own does not inherit it: ``kernels/op_flags.LORA_OPS_FLAGS``). A backend that does not
    provide the hook gets the reference (correct everywhere, not capturable: it groups rows by
    slot on the host).
    """

    name: str

    def prepare(self, token_slots, num_slots: int) -> Any: ...

    def shrink(self, x, lora_a, meta: Any, out) -> None: ...

    def expand(self, buf, lora_b, meta: Any, scaling, out, out_offset: int = 0) -> None: ...

    def expand_slices(self, buf, lora_bs, meta: Any, scaling, out, offsets) -> None: ...

    # Optional (plugin API 14): ``fused_experts_lora(hidden, topk_weights, topk_ids, w13, w2,
    # token_slots, lora: ExpertLoRA, *, activation=None, w13_bias=None, w2_bias=None,
    # expert_map=None) -> [T, H]``: ``FusedOps.fused_experts`` (same arguments and layouts,
    # ``backends/reference/moe.py``) with every token's adapter ``token_slots[t]`` (int32 [T], -1:
    # none) applied to each of its experts' projections (``ExpertLoRA``'s docstring: exact
    # semantics). Oracle ``backends/reference/moe_lora.fused_experts_lora_reference``; conformance
    # ``test_lora_ops.py::test_fused_experts_lora*``. Without it the engine runs the oracle.


@dataclass
class ExpertLoRA:
    """Adapter slots of one MoE layer's experts (``LoRAOps.fused_experts_lora``). ``S`` slots,
    ``E`` experts (this rank's under expert parallelism, in ``w13``'s order), rank ``R`` (zero
    padded), ``n`` parts of ``w13`` (2: gate and up; 1 for an ungated activation)::

        w13_a [S, E, n*R, H]   part i's A in rows [i*R, (i+1)*R)
        w13_b [S, E, N13, R]   N13 = w13's rows; row block i (N13/n rows) is part i's B
        w2_a  [S, E, R, I]     I = w2's columns
        w2_b  [S, E, H, R]
        scaling [S] float32

    For each routed pair (token t, expert e) with slot ``s = token_slots[t] >= 0``::

        c13 = x_t w13[e]^T (+ bias);  c13[part i rows] += scaling[s] * B13_i (A13_i x_t)
        a   = activation(c13)
        y   = a w2[e]^T (+ bias);     y += scaling[s] * w2_b[s, e] (w2_a[s, e] a)
        out[t] += topk_weight * y

    each LoRA term formed in float32 and added to the base product (in the activations' dtype)
    before it is rounded again. Rows with slot -1 get the base experts only."""

    w13_a: Any
    w13_b: Any
    w2_a: Any
    w2_b: Any
    scaling: Any


# The protocol each firstresult hook's return value must satisfy.
HOOK_RESULT_PROTOCOLS = {
    "tessellm_attention_kernel": AttentionKernel,
    "tessellm_fused_ops": FusedOps,
    "tessellm_graph_runner": GraphRunner,
    "tessellm_quant_method": QuantMethod,
    "tessellm_logits_ops": LogitsOps,
    "tessellm_lora_ops": LoRAOps,
}
# The pieces ``tessellm backends --verbose`` reports, by hook.
PIECES = {"attention": "tessellm_attention_kernel", "ops": "tessellm_fused_ops",
          "graph": "tessellm_graph_runner", "quant": "tessellm_quant_method",
          "lora": "tessellm_lora_ops"}


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

        When: once per model load (per distinct sliding window and soft-cap), in the process that runs the
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

    @hookspec(firstresult=True)
    def tessellm_logits_ops(self, backend: Backend, spec: LogitsOpsSpec) -> Optional[LogitsOps]:
        """Return the logits ops (structured output's ``apply_token_bitmask``) for ``backend``.

        When: once per model runner, in the process that samples (engine core or worker).
        Return value: first non-None wins; if none does, the pure-torch reference
        (``backends/reference/logits.py``) is used, so a plugin may skip this hook.
        """

    @hookspec(firstresult=True)
    def tessellm_lora_ops(self, backend: Backend, spec: LoRAOpsSpec) -> Optional[LoRAOps]:
        """Return the batched LoRA ops (``LoRAOps``: prepare, shrink, expand) for ``backend``.

        When: once per model load with LoRA enabled, in the process that runs the model (engine
        core or worker); also by the conformance suite, possibly for an absent device
        (construct without touching it).
        Return value: first non-None wins; if none does, the pure-torch reference
        (``backends/reference/lora.py``) is used, so a plugin may skip this hook. Raise
        ``ValueError`` with one sentence for a spec the backend can never run (e.g. a dtype).
        """
