"""Every environment variable tessellm reads, read here and nowhere else."""

from __future__ import annotations

import os
from typing import Optional


def plugins_allowed() -> Optional[set[str]]:
    """TESSELLM_PLUGINS: comma-separated backend plugin names to load; unset loads all."""
    value = os.environ.get("TESSELLM_PLUGINS")
    if value is None or not value.strip():
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def validate_plugins() -> bool:
    """TESSELLM_VALIDATE_PLUGINS: "1" checks every call of a plugin's attention kernel and fused
    ops (``backends/checked.py``; the conformance suite sets it); default: the first steps."""
    return _switch("TESSELLM_VALIDATE_PLUGINS") is True


def debug() -> bool:
    """TESSELLM_DEBUG: "1" shows full tracebacks for plugin and start-up errors (default: one
    sentence)."""
    return _switch("TESSELLM_DEBUG") is True


def balance_by_step_time() -> bool:
    """TESSELLM_BALANCE_BY_STEP_TIME: "1" weighs each data-parallel core's (and Ray Serve
    replica's) work ahead by its step time over the median (``core/load_report.speed_factors``).
    Off by default: a step's time follows its batch and prefill as much as the hardware, so
    equal cores under uneven work look unequal (a prefix holder that ran smaller steps kept a
    burst it should have spilled); meant for fleets of unequal devices. Set it where the
    balancer runs (the -dp front end; the Serve routers' processes through the deployment's
    env_vars)."""
    return _switch("TESSELLM_BALANCE_BY_STEP_TIME") is True


def api_key() -> Optional[str]:
    """TESSELLM_API_KEY: the server's API key when --api-key is not given."""
    return os.environ.get("TESSELLM_API_KEY") or None


def metrics_names() -> Optional[str]:
    """TESSELLM_METRICS_NAMES: the names /metrics and ``LLM.get_metrics()`` use when the engine
    argument ``metrics_names`` is unset: tessellm, vllm or both (tessellm/metrics/names.py);
    None: unset."""
    return os.environ.get("TESSELLM_METRICS_NAMES", "").strip().lower() or None


def server_dev_mode() -> bool:
    """TESSELLM_SERVER_DEV_MODE (else vLLM's VLLM_SERVER_DEV_MODE): "1" adds the server's
    development routes: /sleep, /wake_up, /is_sleeping, /reset_prefix_cache, /load_weights
    (docs/sleep_mode.md). Off by default: they let any client empty the device."""
    ours = _switch("TESSELLM_SERVER_DEV_MODE")
    return ours if ours is not None else _switch("VLLM_SERVER_DEV_MODE") is True


def compute_nans_in_logits() -> bool:
    """TESSELLM_COMPUTE_NANS_IN_LOGITS (else vLLM's VLLM_COMPUTE_NANS_IN_LOGITS): "1" has the
    sampler count each request's NaN logits every step, and /metrics (``LLM.get_metrics()``)
    count the requests that had any: ``corrupted_requests`` (vLLM's ``vllm:corrupted_requests``).
    Off by default: a pass over the step's logits that nothing else needs."""
    ours = _switch("TESSELLM_COMPUTE_NANS_IN_LOGITS")
    return ours if ours is not None else _switch("VLLM_COMPUTE_NANS_IN_LOGITS") is True


def torch_profiler_dir() -> Optional[str]:
    """TESSELLM_TORCH_PROFILER_DIR, else vLLM's VLLM_TORCH_PROFILER_DIR: where
    ``LLM.stop_profile()`` writes each rank's Chrome trace; unset: no trace files."""
    return os.environ.get("TESSELLM_TORCH_PROFILER_DIR") or os.environ.get("VLLM_TORCH_PROFILER_DIR") or None


def cpu_kv_cache_bytes() -> Optional[int]:
    """TESSELLM_CPU_KV_CACHE_GB: KV cache size for the cpu backend, in GiB."""
    value = os.environ.get("TESSELLM_CPU_KV_CACHE_GB")
    return int(float(value) * (1 << 30)) if value else None


def cpu_native() -> bool:
    """TESSELLM_CPU_NATIVE: "0" keeps the cpu backend on plain torch (no C kernel compiled on
    first use, ``backends/cpu/native.py``); default on where a C compiler is found."""
    return _switch("TESSELLM_CPU_NATIVE") is not False


def cpu_packed_weights_bytes() -> int:
    """TESSELLM_CPU_PACKED_WEIGHTS_MB: how many MiB of oneDNN-packed weight copies the cpu
    backend keeps (default 2048; 0 turns packing off; ``backends/cpu/ops.py``)."""
    value = os.environ.get("TESSELLM_CPU_PACKED_WEIGHTS_MB", "").strip()
    if not value:
        return 2048 << 20
    try:
        mib = int(value)
    except ValueError:
        mib = -1
    if mib < 0:
        raise ValueError(f"TESSELLM_CPU_PACKED_WEIGHTS_MB={value!r} is not understood; "
                         "use a whole number of MiB (0 turns packing off).")
    return mib << 20


def cpu_int4pack() -> bool:
    """TESSELLM_CPU_INT4PACK: "0" keeps the cpu backend's GGUF / int4 layers off torch's CPU
    int4 kernel (``backends/cpu/quant_ops.py``); default on."""
    return _switch("TESSELLM_CPU_INT4PACK") is not False


def triton_interpret() -> bool:
    """TRITON_INTERPRET (Triton's own): "1" (or "true", "on", "yes", "y", as Triton reads it)
    runs Triton kernels in its interpreter on the CPU; the kernels that pick smaller tiles or
    skip hardware-only paths there ask here."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes",
                                                                      "y")


def cpu_compile() -> Optional[bool]:
    """TESSELLM_CPU_COMPILE: "1" compiles the cpu backend's decode step with ``torch.compile``,
    "0" keeps it eager. Unset: None, the cpu plugin's default (eager; docs/plugins.md)."""
    return _switch("TESSELLM_CPU_COMPILE")


def cuda_pdl() -> bool:
    """TESSELLM_PDL: "0" turns off programmatic dependent launch of the cuda backend's captured
    decode kernels (``tessellm/kernels/pdl.py``; default on, where the GPU has it: sm90+)."""
    return _switch("TESSELLM_PDL") is not False


def symm_mem_all_reduce() -> bool:
    """TESSELLM_SYMM_MEM: "0" sends tensor-parallel all-reduces of every size through NCCL
    (default: inputs up to 1 MiB go through the symmetric-memory one-shot all-reduce)."""
    return os.environ.get("TESSELLM_SYMM_MEM", "1").strip() != "0"


def fused_all_reduce_norm() -> bool:
    """TESSELLM_FUSED_AR_NORM: "0" keeps the cuda backend's all-reduce and the RMSNorm after it
    as two kernels (default: one, ``backends/cuda/allreduce_norm.py``, where symmetric memory
    is on)."""
    return _switch("TESSELLM_FUSED_AR_NORM") is not False


def silu_fold() -> bool:
    """TESSELLM_SILU_FOLD: "0" keeps the decoder MLP's gate_up GEMV and its SiLU-and-mul as two
    launches (default: one, a backend's fused product, ``layers.linear.fused_silu_and_mul``: the
    one-row GEMV with the activation in its epilogue, bitwise the two launches). Timed at B1:
    0.8% fewer ms/token on an H100 (session 12), 1.4% on an H200 (4.007 -> 3.949 ms,
    benchmarks/results/h200-2026-12-05-s14)."""
    return _switch("TESSELLM_SILU_FOLD") is not False


def gemv_norm_epilogue() -> bool:
    """TESSELLM_GEMV_NORM_EPILOGUE: "1" runs, at one row, the decoder's post-attention
    residual-add RMSNorm in the last program of the o_proj GEMV and the next layer's input norm
    (or the final norm) in down_proj's (``kernels/gemm/norm_epilogue.py``,
    ``layers.linear.fused_linear_add_rms_norm``, ``models.decoder.link_norm_epilogues``): two
    launches a layer fewer at batch-1 decode, bitwise the unfused launches. Read when the model
    is built. Off by default: on an H100 it made B1 slower (fp8 3.009 -> 3.590 ms/token, bf16
    5.359 -> 5.827; ``benchmarks/b1fuse_device.sh``, benchmarks/README.md session 19)."""
    return _switch("TESSELLM_GEMV_NORM_EPILOGUE") is True


def norm_fold2() -> Optional[bool]:
    """TESSELLM_NORM_FOLD2: "1" splits, at one row, the decoder's post-attention residual-add
    RMSNorm between the o_proj GEMV (its programs each store their slice of the new residual,
    of ``residual * norm weight`` and a partial sum of squares) and the gate_up GEMV (its
    epilogue sums the partials and scales its sums by the norm's rstd), and the next layer's
    input norm between down_proj and qkv_proj alike (``kernels/gemm/norm_fold.py``,
    ``layers.linear.fold_norm_out`` / ``fold_norm_in``, ``models.decoder.link_norm_folds``):
    two launches a layer fewer at batch-1 decode and no work added to either GEMV's weight
    loop. Not bitwise the unfused path (one rounding of the activation instead of two; the
    final norm stays a launch). Read when the model is built. Unset (None): the backend's
    choice for a dense 16-bit model (``models.decoder.norm_fold2_on``: the cuda backend's
    ``CudaOps.norm_fold_default``; timed on an H100, session 20: B1 bf16 5.246 -> 5.154
    ms/token, -1.75%), off for quantized weights (fp8 B1 2.965 -> 3.113, +5%: the fp8 GEMV's
    epilogue costs more than the launch it saves) and float32; "0" off everywhere."""
    return _switch("TESSELLM_NORM_FOLD2")


def fp8_act_fold() -> bool:
    """TESSELLM_FP8_ACT_FOLD: "0" keeps a separate per-token fp8 quantization launch before each
    W8A8 GEMM (the path before 2026-12-05). Default on: where the backend's ``FusedOps`` offer
    the producers, the decoder's RMSNorms and SiLU-and-mul quantize their own output when the
    next linear takes the W8A8 path (``layers.linear.fp8_input_dtype``); bitwise the unfused
    path (on an H100: ``tests/kernels/test_fp8_fold.py``, ``tests/models/test_fp8_act_fold.py``)
    and F fp8 +3.7-10.6% there (``benchmarks/fp8fold_device.sh``)."""
    return _switch("TESSELLM_FP8_ACT_FOLD") is not False


def decode_gemm() -> tuple[bool, bool, int]:
    """TESSELLM_DECODE_GEMM: the Triton tile GEMM for decode-sized row counts
    (``tessellm/kernels/gemm/decode_gemm.py``) in the Triton backends' ``FusedOps``: "1" or
    "all" for the dense linears (not the LM head: up to 32768 outputs) and the decoder MLP's
    gate_up with SiLU-and-mul in its epilogue, "linear" the first only, "silu" the second only;
    unset or "0": off (cuBLAS and a separate SiLU-and-mul), the default until its GPU timing
    (``benchmarks/perf22_device.sh``) decides. TESSELLM_DECODE_GEMM_MAX_ROWS: the most rows it
    takes (default 512; 3 at least: 1-2 rows take the GEMV). Returns (linear, silu, max rows)."""
    value = os.environ.get("TESSELLM_DECODE_GEMM", "").strip().lower()
    choices = {"": (False, False), "0": (False, False), "off": (False, False),
               "1": (True, True), "all": (True, True), "on": (True, True),
               "linear": (True, False), "silu": (False, True)}
    if value not in choices:
        raise ValueError(f"TESSELLM_DECODE_GEMM={value!r} is not understood; use 1 (or all), "
                         "linear, silu or 0.")
    rows = os.environ.get("TESSELLM_DECODE_GEMM_MAX_ROWS", "").strip()
    if rows and (not rows.isdigit() or int(rows) < 3):
        raise ValueError(f"TESSELLM_DECODE_GEMM_MAX_ROWS={rows!r} is not understood; give a "
                         "whole number of rows, 3 or more.")
    return (*choices[value], int(rows) if rows else 512)


def decode_gemm_max_n() -> Optional[int]:
    """TESSELLM_DECODE_GEMM_MAX_N: the most outputs a plain product may have to take
    TESSELLM_DECODE_GEMM's tile GEMM (e.g. 4096 on Llama-3.1-8B: the o and down projections,
    not qkv's 6144); unset: the ops' default (``TritonOps.decode_gemm_max_n``, 32768: not the
    LM head)."""
    value = os.environ.get("TESSELLM_DECODE_GEMM_MAX_N", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"TESSELLM_DECODE_GEMM_MAX_N={value!r} is not understood; give a whole "
                         "number of outputs.")
    return int(value)


def decode_gemm_silu_tiles() -> Optional[tuple[int, int, int, int, int]]:
    """TESSELLM_DECODE_GEMM_SILU_TILES: the launch shape of TESSELLM_DECODE_GEMM's gate_up +
    SiLU-and-mul kernel, "BLOCK_MxBLOCK_NxBLOCK_KxWARPSxSTAGES" (e.g. "128x64x64x4x4", as
    ``benchmarks/kernels/decode_gemm_bench.py`` names its sweep's winners) instead of
    ``decode_gemm.decode_gemm_config``'s; unset: that default."""
    value = os.environ.get("TESSELLM_DECODE_GEMM_SILU_TILES", "").strip().lower()
    if not value:
        return None
    parts = value.split("x")
    if (len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts)
            or any(int(p) & (int(p) - 1) for p in parts[:4])):
        raise ValueError(f"TESSELLM_DECODE_GEMM_SILU_TILES={value!r} is not understood; give "
                         "BLOCK_MxBLOCK_NxBLOCK_KxWARPSxSTAGES, powers of two but the stages, "
                         "e.g. 128x64x64x4x4.")
    return tuple(int(p) for p in parts)


def recurrent_state_device_graphs() -> bool:
    """TESSELLM_RECURRENT_STATE_GRAPHS: whether the recurrent-state models replay captured
    decode graphs on a GPU (state slots a graph input, padded rows in a scratch slot:
    docs/state_space.md). Default on: for the Mamba2-mixer models (Mamba2, Bamba, Granite 4.0-H,
    Nemotron-H, Falcon-H1) on an H100 their graphs gave eager's tokens with 4.9-7.5x faster
    decode steps (benchmarks/results/h100-2026-12-06-s16); Qwen3-Next's gated DeltaNet
    gave the plain greedy tokens with decode and verify graphs there (h100-2026-12-06-s18 and
    -s19). "0" turns them off."""
    value = _switch("TESSELLM_RECURRENT_STATE_GRAPHS")
    return True if value is None else value


def recurrent_verify_graphs() -> bool:
    """TESSELLM_RECURRENT_VERIFY_GRAPHS: "1" captures the verify steps of speculative decoding
    on the recurrent-state models in graphs (``spec_decode/verify_graphs.py`` with
    ``MambaStateCache.verify_batch``; their decode graphs follow TESSELLM_RECURRENT_STATE_GRAPHS).
    On by default (on an H100 they gave the plain greedy tokens for Mamba2 and Qwen3-Next,
    ``benchmarks/hverify_device.sh``, benchmarks/results/h100-2026-12-06-s19); "0" runs verify
    steps eagerly, through the fused verify kernels on cuda and rocm."""
    return _switch("TESSELLM_RECURRENT_VERIFY_GRAPHS") is not False


def ssd_scan() -> bool:
    """TESSELLM_SSD_SCAN: "1" runs Mamba2 prefill chunks through the parallel SSD kernels
    (``kernels/mamba/ssd.py``: five launches parallel over chunks, heads and tiles) instead of
    the sequential chunk scan (``kernels/mamba/chunk_scan.py``, one program per sequence and
    head walking its tokens; that kernel still runs steps whose longest sequence is under
    ``chunk_scan.SSD_MIN_TOKENS``, where its one launch costs less). On by default: on an H100
    the SSD kernels passed the kernel, conformance and model tests and ran 2.0-7.6x faster than
    the sequential scan at 512-8000 tokens (``benchmarks/ssd_device.sh``,
    benchmarks/results/h100-2026-12-06-s19); "0" takes the sequential scan."""
    return _switch("TESSELLM_SSD_SCAN") is not False


def triton_fast_launch() -> bool:
    """TESSELLM_TRITON_FAST_LAUNCH: "1" lets the kernels that use ``kernels/launch.FastLaunch``
    (the recurrent layers' kernels, the RMSNorms, SiLU-and-mul, the rotary) call the kept
    compiled kernel's launcher directly where their specialization was seen before, ~20 us of
    binding less a launch. Off by default (Triton's own ``kernel[grid](...)`` path) until its
    GPU A/B (``benchmarks/mambahost2_device.sh``); on an H100 it passed the kernel and cuda
    parity tests. Read once, at import."""
    return _switch("TESSELLM_TRITON_FAST_LAUNCH") is True


def decode_overlap() -> Optional[bool]:
    """TESSELLM_DECODE_OVERLAP: "1" splits large steps into two micro-batches whose attention
    (on a second stream) overlaps the other's GEMMs (``core/decode_overlap.py``); the engine
    argument ``enable_decode_overlap`` wins where set. Unset: off. Off by default: the
    pure-decode halves measured slower on an H100 at batch 256 of Llama-3.1-8B shapes (+32% a
    step at 512 context, +18% at 1536; benchmarks/results/h100-2026-12-05-s15), and so was the
    mixed split (prefill + decode steps: 29.2 -> 31.7 ms a step, launch-bound in eager mode;
    benchmarks/results/h100-2026-12-06-s21/tbo, ``benchmarks/tbo_device.sh``)."""
    return _switch("TESSELLM_DECODE_OVERLAP")


def decode_overlap_min_rows() -> Optional[int]:
    """TESSELLM_DECODE_OVERLAP_MIN_ROWS: the fewest decode rows (graph steps: the padded size) a
    step must have to be split (``decode_overlap_min_batch`` wins where set); None: unset."""
    return _whole("TESSELLM_DECODE_OVERLAP_MIN_ROWS", 2, "rows")


def decode_overlap_steps() -> Optional[str]:
    """TESSELLM_DECODE_OVERLAP_STEPS: which steps split (``decode_overlap_steps`` wins where
    set): "mixed" (prefill + decode steps: the decodes | the prefill chunks), "decode" (pure
    decode steps, in halves) or "all"; None: unset."""
    value = os.environ.get("TESSELLM_DECODE_OVERLAP_STEPS", "").strip().lower()
    if value and value not in ("mixed", "decode", "all"):
        raise ValueError(f"TESSELLM_DECODE_OVERLAP_STEPS={value!r} is not understood; use mixed, "
                         "decode or all.")
    return value or None


def decode_overlap_min_prefill() -> Optional[int]:
    """TESSELLM_DECODE_OVERLAP_MIN_PREFILL: the fewest prefill tokens a step with decodes must
    have for the mixed split (``decode_overlap_min_prefill`` wins where set); None: unset."""
    return _whole("TESSELLM_DECODE_OVERLAP_MIN_PREFILL", 1, "tokens")


def decode_overlap_sm_carveout() -> Optional[int]:
    """TESSELLM_DECODE_OVERLAP_SM_CARVEOUT: multiprocessors the main stream's cuBLAS GEMMs leave
    free while a split step runs (cuBLASLt's SM count target; ``decode_overlap_sm_carveout``
    wins where set); None: unset (cuBLAS as it chooses)."""
    return _whole("TESSELLM_DECODE_OVERLAP_SM_CARVEOUT", 0, "multiprocessors")


def _whole(name: str, least: int, what: str) -> Optional[int]:
    """A whole-number variable of at least ``least``: None when unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < least:
        raise ValueError(f"{name}={value!r} is not understood; give a whole number of {what} "
                         f">= {least}.")
    return int(value)


def fp8_gemv_x2() -> Optional[bool]:
    """TESSELLM_FP8_GEMV_X2: "1" runs one-row e4m3 W8A16 products through the cuda backend's
    bf16x2 GEMV (``gemv.gemv_fp8_x2``), "0" never; unset: the backend's default."""
    return _switch("TESSELLM_FP8_GEMV_X2")


def gemv_prewait() -> tuple[int, bool, bool]:
    """TESSELLM_GEMV_PREWAIT: what a one-row GEMV program (``gemm/gemv.py``'s FMA kernel,
    ``gemm/gemv_x2.py``'s tiled kernel) reads of its weights before its PDL wait, while its
    predecessor still runs (``kernels/pdl.py``; weights are never written by a step): "N" (1-2)
    its first N weight tiles into registers, "s" its per-channel scales and bias, "l2" its whole
    weight slice asked of the L2 (``cp.async.bulk.prefetch.L2``, one request a row; sm90+,
    under PDL only), joined by "+" (e.g. "2+s"); "0": nothing. Unset: "1", the fastest setting
    measured (H100, 2026-12-06, ``benchmarks/b1pre_device.sh``: engine B1 fp8 3.101 -> 2.958
    ms/token with "1+s", bf16 5.299 -> 5.243 with "1"; "2" and "l2" slower than "1" in the kernel
    chain). Returns (tiles, l2, scales)."""
    value = os.environ.get("TESSELLM_GEMV_PREWAIT", "1").strip().lower()
    tiles, l2, scales = 0, False, False
    for part in (p.strip() for p in value.split("+")) if value else ():
        if part == "l2" and not l2:
            l2 = True
        elif part == "s" and not scales:
            scales = True
        elif part.isdigit() and int(part) <= 2 and not tiles:
            tiles = int(part)
        else:
            raise ValueError(f"TESSELLM_GEMV_PREWAIT={value!r} is not understood; give weight "
                             "tiles 0-2, s (scales), l2, or several joined by + (e.g. 2+s).")
    return tiles, l2, scales


def gemv_split_last() -> bool:
    """TESSELLM_GEMV_SPLIT_LAST: "1" lets the one-row GEMVs (``gemv_x2``'s e4m3 kernel,
    ``gemv``'s FMA kernel) split K where ``gemv_x2_table.SPLIT_TABLE`` / ``BF16_SPLIT_TABLE``
    name a split for the weight shape, and wherever their rules split K, with the partial sums
    combined by each output tile's last program (``kernels/gemm/split_last.py``: no sum and
    cast launches after the GEMV, a fixed order); and the e4m3 GEMV reads
    ``gemv_x2_table.PREWAIT_TILES``' weight tiles before its PDL wait for the shapes there.
    Off by default until timed on the device (``benchmarks/gemv8_device.sh``)."""
    return _switch("TESSELLM_GEMV_SPLIT_LAST") is True


def fp8_lm_head() -> bool:
    """TESSELLM_FP8_LM_HEAD: "1" gives the LM head of a ``quantization="fp8"`` model an e4m3
    copy (one scale per vocabulary row, as its linears; ``loader.model_loader._fp8_lm_head``),
    taken where the backend's fp8 product is weight-only (cuda: decode, up to 32 rows): batch-1
    decode reads 0.53 GB instead of 1.05 GB of head a token on Llama-3.1-8B. Off by default, as
    vLLM keeps the head unquantized: a numerics change (SmolLM2 perplexity in
    docs/quantization.md). Other schemes ignore it (a warning)."""
    return _switch("TESSELLM_FP8_LM_HEAD") is True


def attn_last_split_reduce() -> Optional[bool]:
    """TESSELLM_ATTN_LAST_REDUCE: "1" lets the last-finishing split of a small decode batch's
    split-KV attention combine its head group's partials itself (no reduce launch:
    ``kernels/attention/decode.py``'s _REDUCE_LAST), "0" keeps the separate reduce kernel;
    unset: ``TritonAttentionKernel.last_reduce_max_decodes``'s default."""
    return _switch("TESSELLM_ATTN_LAST_REDUCE")


def int4_tc() -> Optional[bool]:
    """TESSELLM_INT4_TC: "1" re-lays dense AWQ / GPTQ int4 weights at load for the cuda
    backend's tensor-core GEMM (``kernels/gemm/int4_tc.py``, 5+ rows), "0" keeps only the
    checkpoint layout and the tiled GEMM; unset: the backend's default."""
    return _switch("TESSELLM_INT4_TC")


def int4_tc_gemv() -> Optional[bool]:
    """TESSELLM_INT4_TC_GEMV: "1" keeps only the tc layout of dense int4 codes in memory (one
    row through the GEMV on it, ``int4_tc.int4_tc_gemv``, 2+ rows the tc GEMM), "0" keeps the
    checkpoint layout beside it (twice the codes' memory) for ``gemv_int4`` at 1-4 rows; unset:
    the backend's default (``quant_ops.INT4_TC_GEMV``: on since the H100 run of session 20)."""
    return _switch("TESSELLM_INT4_TC_GEMV")


def moe_int4_tc() -> Optional[bool]:
    """TESSELLM_MOE_INT4_TC: "1" runs the Triton fused MoE's int4 grouped GEMMs through the
    tensor-core kernel (``kernels/moe/int4_tc_moe.py``, K and group multiples of 128), "0"
    through ``_expert_gemm_kernel``'s dequantized tiles; unset: the module's default."""
    return _switch("TESSELLM_MOE_INT4_TC")


def moe_int4_dequant_tokens() -> Optional[int]:
    """TESSELLM_MOE_INT4_DEQUANT_TOKENS: from this many tokens the Triton fused MoE's int4
    experts are dequantized to the activations' dtype (a transient workspace, a chunk of experts
    at a time) and multiplied by the 16-bit grouped GEMMs (``kernels/moe/int4_dequant.py``);
    0 turns that path off; unset: the module's default (``MOE_INT4_DEQUANT_TOKENS``: 2048, where
    the H100's crossover lies)."""
    return _whole("TESSELLM_MOE_INT4_DEQUANT_TOKENS", 0, "tokens (0: never dequantize)")


def moe_bnb4_decode_tokens() -> Optional[int]:
    """TESSELLM_MOE_BNB4_DECODE_TOKENS: up to this many tokens the Triton fused MoE's
    bitsandbytes 4-bit experts run its decode kernels on the packed codes
    (``kernels/moe/decode_bnb4.py``), beyond it the dequantized path (``bnb4_dequant.py``); 0
    turns the decode kernels off; unset: the module's default (``BNB4_DECODE_MAX_TOKENS``)."""
    return _whole("TESSELLM_MOE_BNB4_DECODE_TOKENS", 0, "tokens (0: always dequantize)")


def bnb_moe_fused() -> Optional[bool]:
    """TESSELLM_BNB_MOE_FUSED: "0" keeps bitsandbytes 4-bit MoE experts on the layer's dense
    path (the routed experts dequantized in torch, then the backend's plain ``fused_experts``;
    ``layers/moe_bnb.py``) even where the ops declare ``fused_moe_bnb4``; "1" or unset: the
    ops' bnb4 variant where declared (benchmarks compare the two)."""
    return _switch("TESSELLM_BNB_MOE_FUSED")


def fp8_lean_w8a8() -> Optional[bool]:
    """TESSELLM_FP8_LEAN_W8A8: "0" takes the fp8 W8A8 prefill GEMM's checks and views again
    every call (the path before 2026-12-04; benchmarks), "1" caches them per weight (default)."""
    return _switch("TESSELLM_FP8_LEAN_W8A8")


def moe_decode_max_tokens() -> Optional[int]:
    """TESSELLM_MOE_DECODE_MAX_TOKENS: up to this many tokens the fused MoE takes its two-launch
    decode path (``kernels/moe/decode.py``); 0 turns it off; unset: the module's default."""
    value = os.environ.get("TESSELLM_MOE_DECODE_MAX_TOKENS")
    return int(value) if value else None


def moe_decode_route() -> Optional[bool]:
    """TESSELLM_MOE_DECODE_ROUTE: "1" routes inside the MoE decode path's first kernel, "0" in
    a launch of its own before it; unset: the module's default (``kernels/moe/decode.py``)."""
    return _switch("TESSELLM_MOE_DECODE_ROUTE")


def moe_decode_rows() -> Optional[tuple[int, int]]:
    """TESSELLM_MOE_DECODE_ROWS: "UP,DOWN", weight rows a program of the decode path's two
    kernels (benchmarks sweep them; powers of two up to 8); unset: the module's default."""
    value = os.environ.get("TESSELLM_MOE_DECODE_ROWS")
    if not value:
        return None
    up, down = (int(v) for v in value.split(","))
    if not all(r in (1, 2, 4, 8) for r in (up, down)):
        raise ValueError(f"TESSELLM_MOE_DECODE_ROWS={value!r}: give two of 1, 2, 4, 8, e.g. 4,4")
    return up, down


def ray_address() -> Optional[str]:
    """RAY_ADDRESS: the Ray cluster the ``ray`` executor joins (unset: a local one)."""
    return os.environ.get("RAY_ADDRESS") or None


def ray_placement_timeout_s() -> float:
    """TESSELLM_RAY_PLACEMENT_TIMEOUT_S: how long the ``ray`` executor waits for its placement
    group (default 300)."""
    return float(os.environ.get("TESSELLM_RAY_PLACEMENT_TIMEOUT_S", 300))


def omp_threads_set() -> bool:
    """Whether the user set OMP_NUM_THREADS (then workers keep torch's thread count)."""
    return "OMP_NUM_THREADS" in os.environ


def test_worker_fails_at() -> Optional[tuple[int, int]]:
    """TESSELLM_TEST_WORKER_FAILS_AT: "RANK:STEP" makes worker process RANK (``mp`` executor) raise
    in its STEP-th step (1: the first), right after launching it, its KV saves under way: the
    tests of a failing rank (tests/distributed/test_worker_failure.py). Unset: never."""
    value = os.environ.get("TESSELLM_TEST_WORKER_FAILS_AT", "").strip()
    if not value:
        return None
    rank, _, step = value.partition(":")
    if not (rank.isdigit() and step.isdigit() and int(step) >= 1):
        raise ValueError(f"TESSELLM_TEST_WORKER_FAILS_AT={value!r} is not understood; give RANK:STEP, "
                         "e.g. 1:2 (rank 1 fails in its second step).")
    return int(rank), int(step)


def engine_process_env_defaults() -> dict[str, str]:
    """Set for the engine-core process unless the user set them: OpenMP threads that spin while
    idle steal the cores the API process needs (measured on 2 cores: 7x slower steps)."""
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def image_fetch_timeout_s() -> float:
    """TESSELLM_IMAGE_FETCH_TIMEOUT: seconds an http(s) image URL may take to answer and to
    arrive (vLLM's VLLM_IMAGE_FETCH_TIMEOUT; default 5)."""
    return _positive_number("TESSELLM_IMAGE_FETCH_TIMEOUT", 5.0)


def image_fetch_max_bytes() -> int:
    """TESSELLM_IMAGE_FETCH_MAX_MB: the largest image an http(s) URL may serve, in MiB
    (default 20)."""
    return int(_positive_number("TESSELLM_IMAGE_FETCH_MAX_MB", 20.0) * (1 << 20))


def _positive_number(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise ValueError(f"{name}={value!r} is not understood; give a number > 0.")
    return number


def _switch(name: str) -> Optional[bool]:
    """An on/off variable: None when unset or empty; a clear error for anything else."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("1", "on", "true", "yes"):
        return True
    raise ValueError(f"{name}={value!r} is not understood; use 1 or 0.")


def cache_dir() -> str:
    """TESSELLM_CACHE_DIR: where tessellm writes files it derives once (a bundled model
    assembled from its chunk packages); default ~/.cache/tessellm."""
    return os.environ.get("TESSELLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                "tessellm")
