"""All-reduce latency per call, NCCL vs tessellm's symmetric-memory one-shot, inside a CUDA
graph of 64 calls (as in a captured decode step of a 32-layer model). Checks the sums too.

    python benchmarks/allreduce_bench.py --world-size 2 [--output-json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES_KB = [8, 64, 256, 1024, 2048, 4096]


def _run(rank: int, world: int, port: int, out_path):
    import torch.distributed as dist

    from tessellm.distributed.parallel_state import SymmMemAllReduce

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=dev)
    fast = SymmMemAllReduce(dist.group.WORLD, dev, torch.bfloat16)
    rows = []
    for kb in SIZES_KB:
        n = kb * 1024 // 2
        x = torch.full((n,), float(rank + 1), dtype=torch.bfloat16, device=dev)
        want = float(sum(range(1, world + 1)))
        res = {"kb": kb}
        for name in ("nccl", "symm"):
            def step():
                y = x
                for _ in range(64):
                    if name == "nccl":
                        y = y.clone()
                        dist.all_reduce(y)
                    else:
                        y = fast(x)
                return y
            for _ in range(3):
                y = step()
            torch.cuda.synchronize()
            if name == "nccl":
                ok = True  # repeated sums of sums; checked on the first call below
                z = x.clone()
                dist.all_reduce(z)
                ok = bool((z == want).all())
            else:
                ok = bool((fast(x) == want).all())
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                step()
            for _ in range(5):
                g.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(True), torch.cuda.Event(True)
            start.record()
            for _ in range(20):
                g.replay()
            end.record()
            torch.cuda.synchronize()
            res[f"{name}_us"] = round(start.elapsed_time(end) * 1e3 / (20 * 64), 2)
            res[f"{name}_ok"] = ok
        rows.append(res)
    if rank == 0:
        print(json.dumps(rows, indent=1))
        if out_path:
            with open(out_path, "w") as f:
                json.dump({"world_size": world, "graph_of": 64, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    mp.spawn(_run, args=(a.world_size, 29555, a.output_json), nprocs=a.world_size)
