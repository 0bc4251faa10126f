"""The SharedStorageConnector's worker half alone (docs/kv_transfer.md): save and load GB/s.

    PYTHONPATH=$PWD python benchmarks/kvconn_io.py [GIB] [--device cuda] [--profile]

A Llama-3.1-8B-shaped KV cache (64 cache tensors: K and V of 32 layers, 8 KV heads of 128,
bf16, 16-token blocks: 2 MiB a block) on the device (cpu: host memory and the cpu backend's
copies); GIB (1.0) of it is saved as files under $KV_DIR (default /tmp), then loaded into
other blocks: twice from the page cache (the files were just written), once in the background
(the loader thread and the connector's own stream, timed until ``get_finished_loads`` reports
it), then once cold (every file fsynced and dropped from the page cache with posix_fadvise
DONTNEED: read from the disk).
The bytes are compared. Each line: ``save 1.00 GiB in 412 ms = 2.61 GB/s`` (GB: 1e9 bytes),
the device copies included (timed to a device sync). KV_CHECKSUM=crc32|none|sum64 (default
sum64), KV_THREADS=N (default min(8, cores)). ``--profile``: cProfile's top functions of one
save and one load (the main thread's only: the file I/O runs on the pools' threads).
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
    args = sys.argv[1:]
    device = torch.device(args[args.index("--device") + 1] if "--device" in args else "cpu")
    gib = float(next((a for a in args if a[0].isdigit()), 1.0))
    profile = "--profile" in args
    block_bytes = 2 * LAYERS * BS * HEADS * DIM * 2
    n = max(1, int(gib * 2**30) // block_bytes)
    total = n * block_bytes
    caches = []
    for i in range(2 * LAYERS):
        c = torch.empty(2 * n + 1, BS, HEADS, DIM, dtype=torch.bfloat16, device=device)
        c.view(torch.int16).random_(generator=torch.Generator(device).manual_seed(i))
        caches.append(c)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    root = tempfile.mkdtemp(prefix="tessellm-kvio-", dir=os.environ.get("KV_DIR") or None)
    extra = {"shared_storage_path": root}
    if os.environ.get("KV_CHECKSUM"):
        extra["checksum"] = os.environ["KV_CHECKSUM"]
    if os.environ.get("KV_THREADS"):
        extra["io_threads"] = int(os.environ["KV_THREADS"])
    print(f"{n} blocks of {block_bytes >> 20} MiB on {device}; files in {root}; "
          f"checksum {extra.get('checksum', 'sum64')}", flush=True)
    try:
        config = parse_kv_transfer_config({"kv_connector": "SharedStorageConnector",
                                           "kv_role": "kv_both", "kv_connector_extra_config": extra})
        conn = SharedStorageConnector(config, KVConnectorRole.WORKER,
                                      KVConnectorContext(BS, "bench", rank_block_bytes=[block_bytes]))
        conn.register_kv_caches(caches, swap_blocks, sync, device)
        keys = [f"{i:064x}" for i in range(n)]

        def save():
            conn.save_kv({"saves": [[k, i] for i, k in enumerate(keys)], "wait": True})
            conn.wait_for_save()

        def load():
            failed = conn.start_load_kv({"loads": [["r", [[k, n + i] for i, k in enumerate(keys)]]]})
            sync()
            return failed

        def load_background():  # the loader thread, on the connector's stream: until reported
            conn.start_load_kv({"async_loads": [["b", [[k, n + i] for i, k in enumerate(keys)]]]})
            done = {}
            while not done:
                done = conn.get_finished_loads(["b"], timeout=60)
            return [] if done["b"] else ["b"]

        sync()
        _timed(f"save {n} blocks", save, total, profile)
        ok = True
        for run in ("load (page cache)", "load again (page cache)", "load background (page cache)",
                    "load cold (fadvise DONTNEED)"):
            for c in caches:
                c[n:2 * n].zero_()
            if "cold" in run:
                _drop_page_cache(conn, keys)
            sync()
            fn = load_background if "background" in run else load
            assert _timed(run, fn, total, profile and run.startswith("load (")) == [], "a load failed"
            ok = ok and all(torch.equal(c[:n].view(torch.int16), c[n:2 * n].view(torch.int16))
                            for c in caches)
        print("round trip", "equal" if ok else "DIFFERS")
        print(f"staging buffers made: load {conn._load_staging.made}, save {conn._save_staging.made} "
              f"({conn._load_staging.nbytes >> 20} MiB each)")
        conn.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _drop_page_cache(conn, keys) -> None:
    for key in keys:
        fd = os.open(conn.path(key, 0), os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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
        pstats.Stats(pr).sort_stats("tottime").print_stats(10)
    print(f"{what}: {nbytes / 2**30:.2f} GiB in {dt * 1e3:.0f} ms = {nbytes / dt / 1e9:.2f} GB/s", flush=True)
    return out


if __name__ == "__main__":
    main()
