"""Build a model on the selected backend's device and fill its weights."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Optional

import torch

from tessellm.backends.reference.ops import ReferenceOps
from tessellm.backends.spec import AttentionSpec, OpsSpec
from tessellm.config import ModelSource
from tessellm.distributed.parallel_state import PipelineStage, TensorParallel
from tessellm.layers.attention import PerWindowKernels
from tessellm.layers.chunked_attention import ChunkedLocalKernel
from tessellm.layers.context import ModelContext
from tessellm.layers.linear import use_backend_linear
from tessellm.models.registry import model_class
from tessellm.quantization.config import resolve_quant_spec
from tessellm.quantization.loading import (init_dummy_quantized, iter_prequantized_safetensors,
                                           load_quantized_weights, process_quantized,
                                           quantized_weight_filter)
from tessellm.quantization.support import (check_kv_cache_dtype, check_mla_kv_cache_dtype,
                                           quant_method_or_refuse)


def build_model(source: ModelSource, load_format: str, registry, backend, dtype: torch.dtype,
                device: torch.device, block_size: int, kv_cache_dtype: str = "auto", seed: int = 0,
                quantization: Optional[str] = None, tp: Optional[TensorParallel] = None,
                pp: Optional[PipelineStage] = None, pooling: bool = False,
                max_positions: Optional[int] = None, expert_parallel: bool = False,
                max_model_len: Optional[int] = None, max_num_seqs: Optional[int] = None,
                pattern: Optional[str] = None):
    """Returns ``(model, attention_kernel)``; the kernel is shared by every layer.

    ``pooling``: an embedding model (tessellm.pooling): its LM head is never used, so a
    checkpoint may lack one (a bare ``*Model``), and an untied head's memory is given back.

    ``tp`` / ``pp``: this rank's tensor-parallel group and pipeline stage (default: one device).
    Each rank builds and reads only its part: its stage's layers, its slices of split weights.

    ``quantization``: EngineArgs.quantization. It is merged with the checkpoint's own
    quantization_config into a QuantSpec, and the backend's ``tessellm_quant_method`` answer
    becomes every Linear's method; no answer refuses start-up naming the backends that have one.

    ``max_positions``: the positions the engine can rotate (``max_model_len`` plus a drafter's
    lookahead); rotary tables hold no more rows (``ModelContext.max_positions``). None: the
    model's own length, which for Llama 4 Scout (10M positions) is gigabytes per device.

    ``expert_parallel``: EngineArgs.enable_expert_parallel: the routed experts split by expert
    over ``tp`` (``layers/moe.py``); refused for a model without routed experts or a family
    whose experts do not take it (``check_expert_parallel``).

    ``max_model_len`` / ``max_num_seqs``: the engine's limits, given to the attention kernels
    (``AttentionSpec``: a kernel sizes its decode workspace from them). None: unknown.

    ``pattern``: ``load_format="sharded_state"``'s file name (vLLM's
    ``model_loader_extra_config={"pattern": ...}``); None: the default one.
    """
    config = source.hf_config
    cls = model_class(config, pooling)  # raises for unsupported architectures before any allocation
    quant_spec = resolve_quant_spec(quantization, source)
    quant_method = None
    if quant_spec is not None:
        quant_spec = replace(quant_spec, dtype=dtype)
        quant_method = quant_method_or_refuse(registry, backend, quant_spec)
    tp = tp or TensorParallel()
    pp = pp or PipelineStage()
    check_tensor_parallel_quantization(quant_spec, tp.size)
    ops = registry.fused_ops(backend, OpsSpec(dtype)) or ReferenceOps()
    make_kernel, kernels = attention_kernel_factory(registry, backend, config, dtype, block_size,
                                                    kv_cache_dtype, tp, max_model_len, max_num_seqs)
    ctx = ModelContext(ops=ops, make_attention_kernel=make_kernel, dtype=dtype, device=device,
                       quant_method=quant_method, tp=tp, pp=pp,
                       quant_spec=quant_spec if quant_method is not None else None,
                       max_positions=max_positions, expert_parallel=expert_parallel)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config, ctx)
    finally:
        torch.set_default_dtype(previous)
    if expert_parallel:
        check_expert_parallel(model, config)
    if load_format == "sharded_state":
        _load_sharded_state(model, source, quant_spec if quant_method else None, dtype, tp, pp, pooling,
                            pattern)
    else:
        _load_weights(model, source, load_format, dtype, seed, quant_spec if quant_method else None,
                      optional=("lm_head.weight",) if pooling else ())
    if pooling:
        _drop_lm_head(model)
    use_backend_linear(model, ops)
    model.eval()
    model.model_context = ctx  # a drafter built from the target's own checkpoint (MTP) reuses it
    if len(kernels) > 1:  # layers with different sliding windows (Gemma 2, 3) or chunks (Llama 4)
        return model, PerWindowKernels(kernels.values())
    return model, next(iter(kernels.values()))


def check_expert_parallel(model, config) -> None:
    """Refuse ``enable_expert_parallel`` (before any weight is read) where this stage of the
    model has no routed experts, or experts of a family that keeps them sliced."""
    from tessellm.layers.moe import FusedMoE

    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    experts = [m for m in model.modules() if isinstance(getattr(m, "w13", None), torch.Tensor)]
    if not experts:
        raise ValueError(f"enable_expert_parallel is set, but {arch} has no routed experts (on "
                         "this pipeline stage); drop enable_expert_parallel.")
    if not all(isinstance(m, FusedMoE) and m.expert_parallel for m in experts):
        raise ValueError(f"Expert parallelism is not supported for {arch} yet (its experts are "
                         "only sliced over the tensor-parallel group); drop "
                         "enable_expert_parallel. Supported: Mixtral, Qwen2-MoE, Qwen3-MoE, "
                         "OLMoE, Granite MoE, Qwen3-Next, DeepSeek-V2/V3, GLM-4-MoE, dots1.")


def attention_kernel_factory(registry, backend, config, dtype: torch.dtype, block_size: int,
                             kv_cache_dtype: str = "auto", tp: Optional[TensorParallel] = None,
                             max_model_len: Optional[int] = None, max_num_seqs: Optional[int] = None):
    """``(make_kernel, kernels)``: the ``ModelContext.make_attention_kernel`` of a model of
    ``config`` on this rank (one kernel per distinct argument combination, kept in the
    ``kernels`` dict as built). A drafter with layers of the target's shape (MTP) makes its own
    factory, so its kernels never see the target's batches. ``max_model_len`` /
    ``max_num_seqs``: the engine's limits, in every ``AttentionSpec`` (None: unknown)."""
    tp = tp or TensorParallel()
    from tessellm.config import text_config
    from tessellm.models.decoder import shard_heads

    text = text_config(config)  # the paged attention layers are the language model's
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "num_heads")  # Mamba2: num_heads
    local_heads, local_kv_heads, _ = shard_heads(
        heads, getattr(text, "num_key_value_heads", None) or heads, tp.rank, tp.size)
    kernels = {}

    def make_kernel(window, logit_softcap=None, attention_sinks=False,
                    attention_chunk_size=None, key_window=None, **shape):
        """``shape``: AttentionSpec fields a family sets itself (MLA: ``num_kv_heads``,
        ``head_size``, ``mla_value_size``, ``models/deepseek_mla.py``; Gemma 3 with images:
        ``prefill_key_limits``). ``attention_chunk_size`` (Llama 4): the backend's kernel
        behind ``ChunkedLocalKernel``. ``key_window`` (ModernBERT's local layers): behind
        ``SymmetricWindowKernel``, each row's key limit cut to its position + key_window."""
        key = (window, logit_softcap, attention_sinks, attention_chunk_size, key_window,
               tuple(sorted(shape.items())))
        if key not in kernels:
            spec = AttentionSpec(**{
                "num_heads": local_heads, "num_kv_heads": local_kv_heads,
                "head_size": getattr(text, "head_dim", None) or text.hidden_size // heads,
                "dtype": dtype, "block_size": block_size, "kv_cache_dtype": kv_cache_dtype,
                "sliding_window": window, "logit_softcap": logit_softcap,
                "attention_sinks": attention_sinks, "max_model_len": max_model_len,
                "max_num_seqs": max_num_seqs, **shape})
            kernel = mla_kernel_or_refuse(registry, backend, spec)
            if kernel is None:
                raise RuntimeError(f"No plugin provides an attention kernel for backend "
                                   f"{backend.name!r} with {spec}.")
            check_kv_cache_dtype(registry, backend, kernel, spec)
            check_logit_softcap(registry, backend, kernel, spec)
            check_attention_sinks(registry, backend, kernel, spec)
            check_key_limits(registry, backend, kernel, spec)
            if attention_chunk_size is not None:
                kernel = ChunkedLocalKernel(kernel, attention_chunk_size, block_size)
            if key_window is not None:
                from tessellm.layers.symmetric_window import SymmetricWindowKernel

                kernel = SymmetricWindowKernel(kernel, key_window)
            kernels[key] = kernel
        return kernels[key]

    return make_kernel, kernels


def mla_kernel_or_refuse(registry, backend, spec: AttentionSpec):
    """The backend's kernel for ``spec``; for multi-head latent attention (``mla_value_size``)
    one that declares ``supports_mla``, else one sentence naming the backend, the option and the
    backends that can (a kernel that does not know the field would read the latent cache as
    K/V heads, or fail in its own words on the latent row's width: that error is chained)."""
    if spec.mla_value_size is None:
        return registry.attention_kernel(backend, spec)
    check_mla_kv_cache_dtype(registry, backend, spec)
    what = (f"uses multi-head latent attention (MLA: a latent KV cache of {spec.head_size} "
            f"values a token, AttentionSpec.mla_value_size={spec.mla_value_size})")
    try:
        kernel = registry.attention_kernel(backend, spec)
    except Exception as exc:
        _require_kernel_flag(registry, backend, None, "mla", what, cause=exc)
    _require_kernel_flag(registry, backend, kernel, "mla", what)
    return kernel


def check_logit_softcap(registry, backend, kernel, spec: AttentionSpec) -> None:
    """Refuse a model whose attention scores are soft-capped on a backend whose kernel does not
    declare ``supports_logit_softcap`` (the contract's flag: a kernel that does not know the
    spec field would silently ignore it)."""
    cap = spec.logit_softcap
    if cap is not None:
        _require_kernel_flag(registry, backend, kernel, "logit_softcap",
                             f"soft-caps its attention logits (logit_softcap={cap}, the config's "
                             "attn_logit_softcapping)")


def check_attention_sinks(registry, backend, kernel, spec: AttentionSpec) -> None:
    """Refuse a model with attention sinks on a backend whose kernel does not declare
    ``supports_attention_sinks`` (it would never be given, or would drop, the ``sinks``)."""
    if spec.attention_sinks:
        _require_kernel_flag(registry, backend, kernel, "attention_sinks",
                             "has attention sinks (attention_sinks, a learned logit per head in "
                             "the softmax: gpt-oss's self_attn.sinks)")


def _require_kernel_flag(registry, backend, kernel, feature: str, what: str,
                         cause: Optional[Exception] = None) -> None:
    """One sentence naming the feature, the backend, its kernel and the backends that declare
    ``feature`` in their capabilities, unless the kernel declares ``supports_<feature>``
    (``cause``: the kernel could not even be built for the spec; chained)."""
    if kernel is not None and getattr(kernel, f"supports_{feature}", False):
        return
    others = [name for name, b in sorted(registry.backends.items())
              if name != backend.name and b.capabilities.get(feature)]
    raise ValueError(f"The model {what}, which backend {backend.name!r} cannot do (its "
                     f"attention kernel {getattr(kernel, 'name', kernel)!r} does not declare "
                     f"supports_{feature}); run it on "
                     + (f"a backend that can: {', '.join(others)}." if others
                        else "a backend whose kernel declares it.")) from cause


def check_key_limits(registry, backend, kernel, spec: AttentionSpec) -> None:
    """Refuse a model whose prefill rows see keys past their position (Gemma 3's image
    tokens see their whole image) on a backend whose kernel does not declare
    ``supports_key_limits`` (it would attend causally: tokens unlike HF's)."""
    if spec.prefill_key_limits:
        _require_kernel_flag(registry, backend, kernel, "key_limits",
                             "lets prompt tokens attend to later tokens (AttentionSpec."
                             "prefill_key_limits: Gemma 3's image tokens attend to the whole "
                             "image, an encoder's tokens to the whole prompt)")


def check_tensor_parallel_quantization(quant_spec, tp_size: int) -> None:
    """What tensor parallelism cannot split, refused before any weight is read (the engine
    calls this before its workers start). Each rank quantizes its slice of a dense checkpoint
    (int8, fp8), and cuts a pre-quantized one as stored (``quantization/sharding.py``: fp8
    with its scales, AWQ/GPTQ int4, GGUF blocks, bitsandbytes). Left: GPTQ act-order, whose
    groups scatter over every row-parallel rank's inputs. (A split off the int4 group, GGUF or
    bnb 4-bit block boundaries, which needs the layers' sizes, is refused as its layer
    loads.)"""
    if quant_spec is None or tp_size == 1:
        return
    if quant_spec.scheme == "gptq" and quant_spec.config.get("desc_act"):
        raise ValueError(f"A GPTQ act-order (desc_act) checkpoint cannot run with "
                         f"tensor_parallel_size={tp_size} yet: each group's input rows are "
                         "scattered over every rank's columns of the row-parallel layers; use "
                         "tensor_parallel_size=1 (or pipeline_parallel_size), or a GPTQ "
                         "checkpoint quantized without desc_act.")


def _drop_lm_head(model) -> None:
    """A pooling model computes no logits: an untied head's weight (vocab x hidden) is freed."""
    from tessellm.layers.vocab import ParallelLMHead

    for head in (m for m in model.modules() if isinstance(m, ParallelLMHead)):
        if head.tied is None and head.weight.numel():
            head.weight = torch.nn.Parameter(head.weight.new_empty(0, head.weight.shape[-1]),
                                             requires_grad=False)


def _load_sharded_state(model, source: ModelSource, quant_spec, dtype: torch.dtype,
                        tp: TensorParallel, pp: PipelineStage, pooling: bool,
                        pattern: Optional[str] = None) -> None:
    """``load_format="sharded_state"``: this rank's own files (``loader/sharded_state.py``);
    quantized layers rebuilt as saved (``loader/sharded_quant.py``), never quantized again."""
    from tessellm.loader.sharded_quant import check_supported
    from tessellm.loader.sharded_state import load_sharded_state

    if pooling:
        raise ValueError("load_format='sharded_state' does not load pooling (embedding) models "
                         "yet; load the checkpoint with load_format='auto'.")
    scheme = quant_spec.scheme if quant_spec is not None else None
    check_supported(model, scheme, "load")
    load_sharded_state(model, source.path, pp.stage * tp.size + tp.rank,
                       sharded_state_layout(tp.size, pp.num_stages, dtype, scheme), pattern)
    if quant_spec is not None:
        _fp8_lm_head(model, quant_spec)


def sharded_state_layout(tp_size: int, pp_size: int, dtype: torch.dtype,
                         quantization: Optional[str]) -> dict:
    """What a sharded state records and must match at load (``loader/sharded_state.py``)."""
    return {"tensor_parallel_size": tp_size, "pipeline_parallel_size": pp_size,
            "dtype": str(dtype).removeprefix("torch."), "quantization": quantization}


def _load_weights(model, source: ModelSource, load_format: str, dtype: torch.dtype, seed: int,
                  quant_spec=None, optional: tuple = ()) -> None:
    if load_format == "dummy":
        if quant_spec is None:
            from tessellm.loader.dummy import init_dummy_weights

            init_dummy_weights(model, seed)
        else:
            init_dummy_quantized(model, seed)
            process_quantized(model)
            _fp8_lm_head(model, quant_spec)
        return
    weights = _weight_stream(model, source, dtype, quant_spec)
    from tessellm.multimodal.text_only import image_text_architecture, text_weights

    if image_text_architecture(source.hf_config) is not None:  # images off: the vision tensors skipped
        weights = text_weights(weights)
    loaded = load_quantized_weights(model, weights) if quant_spec else model.load_weights(weights)
    expected = {n for n, _ in model.named_parameters()}
    missing = sorted(expected - loaded - set(optional))
    if missing:
        raise ValueError(f"The checkpoint at {source.path} lacks {len(missing)} weights, e.g. "
                         f"{missing[:3]}; is it complete and the right architecture?")
    if quant_spec is not None:
        process_quantized(model)
        if source.kind == "gguf" and quant_spec.scheme == "gguf":
            _quantize_lm_head(model, source.path)
        _fp8_lm_head(model, quant_spec)


@torch.no_grad()
def _fp8_lm_head(model, quant_spec) -> None:
    """TESSELLM_FP8_LM_HEAD=1 (``envs.fp8_lm_head``) with ``quantization="fp8"``: the LM head
    keeps an e4m3 copy of its weight (one scale per vocabulary row, ``packed.quantize_fp8``,
    as the fp8 linears quantize on load) and computes the logits from it where the linears'
    ``QuantOps.fp8_mm`` is weight-only at that row count (``fp8_w8a8_rows(rows)`` False: on
    cuda up to 32 rows, i.e. decode, through the one-row GEMV at batch 1), from the dense
    weight elsewhere (prefill, prompt logprobs, large batches, and every row count of a
    backend whose fp8 is W8A8 throughout, as the cpu's): the activation is never quantized
    for the head, and perplexity from prompt logprobs is the fp8 model's. Each tensor-parallel
    rank quantizes its vocabulary rows (per-row scales: the one-device values). The dense
    weight stays (it serves those rows; a tied one is the embedding), so this saves read
    bandwidth at decode, not memory. Off: nothing changes."""
    from tessellm import envs

    if not envs.fp8_lm_head():
        return
    import logging

    from tessellm.layers.vocab import ParallelLMHead
    from tessellm.quantization.loading import quantized_linears
    from tessellm.quantization.packed import Fp8Weight, quantize_fp8

    log = logging.getLogger(__name__)
    fp8 = [layer for layer in quantized_linears(model).values()
           if getattr(layer.quant_method, "name", None) == "fp8"
           and getattr(layer, "segments", None) and layer.segments[0].kind == "fp8"]
    if quant_spec is None or quant_spec.scheme != "fp8" or not fp8:
        log.warning("TESSELLM_FP8_LM_HEAD=1 applies to quantization='fp8' models only (this one: "
                    "%s); the LM head stays in the model dtype.",
                    quant_spec.scheme if quant_spec is not None else "unquantized")
        return
    ops = fp8[0].quant_method.ops
    fp8_dtype = fp8[0].segments[0].qweight.dtype
    for head in (m for m in model.modules() if isinstance(m, ParallelLMHead)):
        dense = head.tied if head.tied is not None else head.weight
        if dense.numel() == 0 or head.quant_mm is not None:
            continue  # no logits here (pooling), or already quantized (GGUF blocks)
        # By slabs of rows: quantize_fp8 widens to float32 (2 GB for Llama-3's whole head).
        parts = [quantize_fp8(rows, fp8_dtype) for rows in dense.data.split(16384)]
        seg = parts[0] if len(parts) == 1 else Fp8Weight(
            torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]))
        # the head's dense product as it is at call time (use_backend_linear sets it later)
        head.set_quantized(seg, fp8_head_mm(ops, dense, lambda x, d, h=head: h.dense_mm(x, d)))


FP8_HEAD_REFINE = 16  # logits of each row recomputed from the dense head (fp8_head_mm)


def fp8_head_mm(ops, dense: torch.Tensor, dense_mm, refine: int = FP8_HEAD_REFINE):
    """The fp8 LM head's product (``_fp8_lm_head``): where ``ops.fp8_mm`` is weight-only at
    ``x``'s row count (the ops' ``fp8_w8a8_rows`` says False; an ops without that member:
    never), the logits of the e4m3 copy with each row's ``refine`` largest recomputed from the
    dense weight (a gather of ``refine`` rows, 128 KB at Llama-8B's hidden size), so greedy
    picks and the top logprobs are the dense head's wherever the dense top token is among the
    fp8 top ``refine`` (as the cpu's GGUF head does, ``CpuQuantOps.lm_head_mm``); elsewhere
    ``dense_mm(x, dense)``. The row count is fixed per captured graph."""
    w8a8_rows = getattr(ops, "fp8_w8a8_rows", None)

    def mm(x: torch.Tensor, w) -> torch.Tensor:
        if w8a8_rows is None or w8a8_rows(x.shape[0]):
            return dense_mm(x, dense)
        logits = ops.fp8_mm(x, w)
        if refine <= 0:
            return logits
        top = logits.topk(min(refine, logits.shape[-1]), dim=-1).indices  # [M, R]
        exact = torch.bmm(dense[top], x[:, :, None].to(dense.dtype))[..., 0]  # [M, R]
        return logits.scatter_(-1, top, exact.to(logits.dtype))

    return mm


def _quantize_lm_head(model, path) -> None:
    """``quantization="gguf"``: the LM head reads the file's own blocks (``output.weight``, or
    the tied ``token_embd.weight``) through the quant method's ops, as llama.cpp does, when its
    kind has a product. Split over tensor-parallel ranks, each reads its vocabulary rows of the
    blocks (where the vocabulary splits evenly: no padding rows). The embedding lookup stays
    dense."""
    from tessellm.layers.vocab import ParallelLMHead
    from tessellm.loader.gguf_loader import read_quantized
    from tessellm.quantization.gguf import segment_from_blocks
    from tessellm.quantization.loading import quantized_linears

    heads = [m for m in model.modules()
             if isinstance(m, ParallelLMHead) and m.vocab_size % m.tp.size == 0]
    methods = [layer.quant_method for layer in quantized_linears(model).values()]
    if not heads or not methods or not getattr(methods[0].ops, "quantized_lm_head", False):
        return
    head = heads[0]
    raw = read_quantized(path, "output.weight") if head.tied is None else None
    if raw is None:
        raw = read_quantized(path, "token_embd.weight")
    if raw is not None and head.tp.size > 1:
        raw = raw.split_rows([head.vocab_start, head.vocab_end - head.vocab_start,
                              head.vocab_size - head.vocab_end])[1]
    dense = head.tied if head.tied is not None else head.weight
    if raw is None or tuple(raw.shape) != tuple(dense.shape):
        return
    seg = segment_from_blocks(raw.qtype, raw.data.numpy(), raw.shape)
    ops = methods[0].ops
    if seg is None or not hasattr(ops, f"{seg.kind}_mm"):
        return
    if hasattr(ops, "lm_head_mm"):  # e.g. the cpu's: refines the top logits from ``dense``
        head.set_quantized(seg.to(dense.device), lambda x, w: ops.lm_head_mm(x, w, dense))
    else:
        head.set_quantized(seg.to(dense.device), getattr(ops, f"{seg.kind}_mm"))


def _weight_stream(model, source: ModelSource, dtype: torch.dtype, quant_spec):
    if source.kind == "gguf":
        from tessellm.loader.gguf_loader import iter_gguf_weights

        keep = None
        if quant_spec is not None and quant_spec.scheme == "gguf":
            keep = quantized_weight_filter(model)  # linear layers stay in their GGUF blocks
        return iter_gguf_weights(source.path, dtype, keep_quantized=keep)
    if quant_spec is not None and quant_spec.config.get("prequantized"):
        return iter_prequantized_safetensors(source.path, dtype)  # fp8 / int32 / scales kept
    from tessellm.loader.safetensors_loader import iter_safetensors_weights

    # Lazy: a tensor-parallel rank reads only the rows or columns it holds (quantized on load
    # too: Linear.local_slice narrows before the quant method sees the tensor).
    return iter_safetensors_weights(source.path, dtype, lazy=True)


@functools.lru_cache(maxsize=8)
def load_tokenizer(source_path: str, kind: str, tokenizer_dir: str | None = None):
    """The HF tokenizer for a model, or None when the directory has no tokenizer files."""
    if kind == "gguf" and tokenizer_dir is None:
        from tessellm.loader.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(source_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir or source_path)
