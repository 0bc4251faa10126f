"""The SharedStorageConnector's worker half on the host (docs/kv_transfer.md): save and load GB/s.

    PYTHONPATH=$PWD python benchmarks/kvconn_cpu.py [GIB] [--profile]

A Llama-3.1-8B-shaped cache in host memory (64 cache tensors: K and V of 32 layers, 8 KV heads
of 128, bf16, 16-token blocks: 2 MiB a block) on the cpu backend; GIB (1.0) of it is saved as
files under $KV_DIR (default /tmp), then loaded into other blocks (twice: the page cache is warm
both times, the files were just written; a cold read from disk is the device script's second
run on a fresh box, or `echo 3 > /proc/sys/vm/drop_caches` as root), and the bytes compared.
``--profile``: cProfile's top functions of one save and one load. Prints one line per phase:
``save 1.00 GiB in 412 ms = 2.6 GB/s`` (GB: 1e9 bytes). The checksum is the connector's
default; KV_CHECKSUM=crc32|none for the others.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import torch

from tessellm.backends.reference.kv_transfer import swap_blocks
from tessellm.kv_transfer import KVConnectorContext, KVConnectorRole
from tessellm.kv_transfer.config import parse_kv_transfer_config
from tessellm.kv_transfer.shared_storage import SharedStorageConnector

LAYERS, HEADS, DIM, BS = 32, 8, 128, 16


def main() -> None:
    gib = float(next((a for a in sys.argv[1:] if not a.startswith("-")), 1.0))
    profile = "--profile" in sys.argv
    block_bytes = 2 * LAYERS * BS * HEADS * DIM * 2
    n = max(1, int(gib * 2**30) // block_bytes)
    total = n * block_bytes
    caches = [torch.empty(2 * n + 1, BS, HEADS, DIM, dtype=torch.bfloat16) for _ in range(2 * LAYERS)]
    for i, c in enumerate(caches):
        c.view(torch.int16).random_(generator=torch.Generator().manual_seed(i))
    root = tempfile.mkdtemp(prefix="tessellm-kvcpu-", dir=os.environ.get("KV_DIR") or None)
    extra = {"shared_storage_path": root}
    if os.environ.get("KV_CHECKSUM"):
        extra["checksum"] = os.environ["KV_CHECKSUM"]
    try:
        config = parse_kv_transfer_config({"kv_connector": "SharedStorageConnector",
                                           "kv_role": "kv_both", "kv_connector_extra_config": extra})
        conn = SharedStorageConnector(config, KVConnectorRole.WORKER,
                                      KVConnectorContext(BS, "bench", rank_block_bytes=[block_bytes]))
        conn.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
        keys = [f"{i:064x}" for i in range(n)]

        def save():
            conn.save_kv({"saves": [[k, i] for i, k in enumerate(keys)], "wait": True})
            conn.wait_for_save()

        def load():
            return conn.start_load_kv({"loads": [["r", [[k, n + i] for i, k in enumerate(keys)]]]})

        _timed(f"save {n} blocks", save, total, profile)
        for run in ("load (warm page cache)", "load again"):
            for c in caches:
                c[n:2 * n].zero_()
            assert _timed(run, load, total, profile and run.startswith("load (")) == []
        ok = all(torch.equal(c[:n].view(torch.int16), c[n:2 * n].view(torch.int16)) for c in caches)
        print("round trip", "equal" if ok else "DIFFERS")
        conn.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _timed(what, fn, nbytes, profile):
    if profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    if profile:
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(12)
    print(f"{what}: {nbytes / 2**30:.2f} GiB in {dt * 1e3:.0f} ms = {nbytes / dt / 1e9:.2f} GB/s", flush=True)
    return out


if __name__ == "__main__":
    main()
