"""Where a verify pass's time goes (issue 25, benchmarks/spec_decode.py part ``replay``).

* ``graph_times``: GPU time of one replay of the captured decode step (1 token) and of each
  captured verify step (q = 2..k+1 tokens) at batch 1 over a ``ctx``-token context, by CUDA
  events around back-to-back replays: the device's share of a step, no host work in it.
* ``verify_prefill_kernel_ms`` (in ``graph_times``): the verify graphs captured again with
  attention through the prefill kernel, as before verify steps took the split-KV kernel.
* ``attention_times``: one layer's attention at batch 1 (Llama-3.1-8B heads: 32 q / 8 KV heads of
  128, bf16, 16-token blocks) for q query tokens over the same context: the prefill kernel
  (what verify steps ran through before) against the split-KV kernel with q queries per
  sequence (``decode_attention(query_len=q)``, what they run through now), in microseconds per
  layer from a CUDA graph of 32 calls.
* ``host_profile``: cProfile of a callable, the top functions by own time (the host's share).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "kernels"))

from gpu_timing import capture_graph, events_ms as _events  # noqa: E402


@torch.inference_mode()
def graph_times(llm, ctx: int, iters: int = 50) -> dict:
    """Decode and verify graph replays at batch 1 (slots -1: nothing written to the cache)."""
    runner = llm.engine.core.runner
    dev, bs = runner.device, runner.block_size
    blocks = -(-ctx // bs)
    table = torch.arange(blocks, dtype=torch.int32, device=dev)[None]
    seq_lens = torch.tensor([ctx], dtype=torch.int32, device=dev)
    decode = [torch.zeros(1, dtype=torch.int64, device=dev),
              torch.tensor([ctx - 1], dtype=torch.int64, device=dev),
              torch.full((1,), -1, dtype=torch.int64, device=dev), seq_lens, table]
    result = {"ctx": ctx, "decode_ms": round(_events(lambda: runner.graph_runner.run(decode), iters), 4),
              "verify_ms": {}}
    graphs = runner.verify_graphs
    for q, g in sorted((graphs.runners if graphs is not None else {}).items()):
        inputs = [torch.zeros((1, q), dtype=torch.int64, device=dev),
                  torch.arange(ctx - q, ctx, dtype=torch.int64, device=dev)[None],
                  torch.full((1, q), -1, dtype=torch.int64, device=dev), seq_lens, table]
        result["verify_ms"][str(q)] = round(_events(lambda g=g, i=inputs: g.run(i), iters), 4)
    if graphs is not None:
        result["verify_prefill_kernel_ms"] = _prefill_path_times(runner, graphs, decode, ctx, iters)
    return result


def _prefill_path_times(runner, graphs, decode, ctx: int, iters: int) -> dict:
    """The same verify graphs (batch 1) captured with attention through the prefill kernel, as
    before verify steps took the split-KV kernel (``max_verify_rows = 0``)."""
    from tessellm.spec_decode.verify_graphs import VerifyGraphs

    kernel, dev, out = runner.kernel, runner.device, {}
    saved, kernel.max_verify_rows = kernel.max_verify_rows, 0
    try:
        old = VerifyGraphs(runner.model, kernel, dev, runner.max_model_len, runner.block_size,
                           runner.verify_graph_factory, graphs.max_q, (1,))
        old.capture()
        for q, g in sorted(old.runners.items()):
            inputs = [torch.zeros((1, q), dtype=torch.int64, device=dev),
                      torch.arange(ctx - q, ctx, dtype=torch.int64, device=dev)[None],
                      torch.full((1, q), -1, dtype=torch.int64, device=dev), decode[3], decode[4]]
            out[str(q)] = round(_events(lambda g=g, i=inputs: g.run(i), iters), 4)
    finally:
        kernel.max_verify_rows = saved
    return out


def attention_times(ctx: int, qs, layers: int = 32, iters: int = 20) -> dict:
    """Per-layer microseconds, from a CUDA graph of ``layers`` back-to-back calls (launched
    one by one from Python, the calls would time the launches, not the kernels)."""
    from tessellm.kernels.attention import decode_attention, prefill_attention
    from tessellm.kernels.attention.paged import TritonAttentionKernel
    from tessellm.backends.spec import AttentionSpec

    dev, heads, kv_heads, d, bs = torch.device("cuda"), 32, 8, 128, 16
    spec = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_size=d, dtype=torch.bfloat16,
                         block_size=bs)
    kernel = TritonAttentionKernel(spec, max_model_len=131072, max_num_seqs=1024)
    blocks = -(-ctx // bs)
    k_cache = torch.randn(blocks + 1, bs, kv_heads, d, dtype=torch.bfloat16, device=dev)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(blocks + 1, device=dev)[:blocks].to(torch.int32)[None]
    seq_lens = torch.tensor([ctx], dtype=torch.int32, device=dev)
    out = {"ctx": ctx, "layers_per_graph": layers, "split_kv_us": {}, "prefill_us": {}}
    for q in qs:
        x = torch.randn(q, heads, d, dtype=torch.bfloat16, device=dev)
        o = torch.empty_like(x)
        qsl = torch.tensor([0, q], dtype=torch.int32, device=dev)
        ws = torch.empty(kernel.workspace_numel(1, q), dtype=torch.float32, device=dev)
        calls = {"split_kv_us": lambda: decode_attention(
            x, k_cache, v_cache, o, qsl, seq_lens, table, d ** -0.5, num_seqs=1,
            num_splits=kernel.num_splits(1), workspace=ws, query_len=q)}
        if q > 1:
            calls["prefill_us"] = lambda: prefill_attention(x, k_cache, v_cache, o, qsl, seq_lens, table,
                                                            d ** -0.5, seq_offset=0, num_seqs=1, max_query_len=q)
        for key, call in calls.items():
            out[key][str(q)] = round(_graph_of(call, layers, iters) * 1e3 / layers, 2)
    return out


def _graph_of(call, layers: int, iters: int) -> float:
    """Milliseconds per replay of a CUDA graph holding ``layers`` calls."""
    return _events(capture_graph(call, layers).replay, iters)


def host_profile(fn, top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()
