"""Tensor and pipeline parallelism on GPUs (NCCL, CUDA graphs per rank): greedy tokens equal
to one GPU in float32. Needs at least two CUDA devices."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM

from test_parallel_parity import _tokens

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    path = tiny_model_dir("llama-sharp")
    with LLM(path, device="cuda", dtype="float32", num_kv_blocks=64, seed=0) as llm:
        return path, _tokens(llm)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_cuda_matches_one_gpu(reference, tp, pp):
    path, expected = reference
    with LLM(path, device="cuda", dtype="float32", num_kv_blocks=64, seed=0,
             tensor_parallel_size=tp, pipeline_parallel_size=pp, max_num_batched_tokens=24) as llm:
        info = llm.engine.core.executor.worker_info
        assert [i["device"] for i in info] == ["cuda:0", "cuda:1"]
        assert info[0]["graphs"] == (pp == 1)  # CUDA graphs (with NCCL inside) under TP
        assert _tokens(llm) == expected


def _fused_norm_rank(rank, init_file):
    import torch.distributed as dist

    from tessellm.kernels.pdl import graph_scope
    from tessellm.backends.cuda.ops import CudaOps as TritonOps
    from tessellm.distributed.parallel_state import TensorParallel

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank,
                            world_size=2, device_id=device)
    ops = TritonOps()
    hidden = 4096
    for dtype in (torch.bfloat16, torch.float32):
        tp = TensorParallel(rank, 2, dist.group.WORLD)
        assert tp.enable_fast_all_reduce(device, dtype)
        weight = torch.randn(hidden, device=device).to(dtype)

        def inputs(rows, seed):
            g = torch.Generator(device=device).manual_seed(seed)
            return (torch.randn(2, rows, hidden, generator=g, device=device).to(dtype),
                    torch.randn(rows, hidden, generator=g, device=device).to(dtype))

        def check(xs, residual, out, new_res):
            s = (xs[0].float() + xs[1].float()).to(dtype)  # the sum in rank order, rounded
            want_out, want_res = ops.fused_add_rms_norm(s, residual.clone(), weight, 1e-5)
            assert torch.equal(new_res, want_res) and torch.equal(out, want_out)

        # eager, sizes up and down (the slot reset), and one above the buffer (unfused)
        for i, rows in enumerate([1, 128, 7, 1, 3, 200, 64]):
            xs, residual = inputs(rows, i)
            out, new_res = ops.all_reduce_add_rms_norm(xs[rank].clone(), residual.clone(),
                                                       weight, 1e-5, tp)
            check(xs, residual, out, new_res)
        assert tp.workspaces[("cuda.allreduce_norm", dtype, hidden)] is not None

        # a CUDA graph of two calls (not a multiple of the three slots), replayed
        static = [inputs(rows, 100 + rows) for rows in (1, 5)]
        x_in = [xs[rank].clone() for xs, _ in static]
        r_in = [r.clone() for _, r in static]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), graph_scope():
            for x, r in zip(x_in, r_in):  # warm-up (compiles the PDL variant)
                ops.all_reduce_add_rms_norm(x.clone(), r.clone(), weight, 1e-5, tp)
            with torch.cuda.graph(graph, stream=stream):
                outs = [ops.all_reduce_add_rms_norm(x, r, weight, 1e-5, tp)
                        for x, r in zip(x_in, r_in)]
        torch.cuda.current_stream(device).wait_stream(stream)
        for replay in range(3):
            fresh = [inputs(rows, 1000 * replay + rows) for rows in (1, 5)]
            for (xs, r), x_dst, r_dst in zip(fresh, x_in, r_in):
                x_dst.copy_(xs[rank])
                r_dst.copy_(r)
            graph.replay()
            for (xs, r), (out, new_res) in zip(fresh, outs):
                check(xs, r, out, new_res)
    dist.destroy_process_group()


def test_fused_all_reduce_norm_over_symmetric_memory(tmp_path):
    """TritonOps.all_reduce_add_rms_norm over NVLink is bit for bit the all-reduce (sum in rank
    order) then fused_add_rms_norm: eager at several sizes, and in a replayed CUDA graph."""
    from tessellm.testing.ranks import run_ranks

    run_ranks(_fused_norm_rank, 2, (str(tmp_path / "rdzv"),), timeout_s=300)
