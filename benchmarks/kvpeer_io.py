"""The ZmqPeerConnector's worker halves alone, between two processes over loopback TCP
(docs/kv_transfer.md, "Over TCP"): how fast a consumer fetches a producer's blocks.

    PYTHONPATH=$PWD python benchmarks/kvpeer_io.py [MIB] [--device cuda] [--profile]

A Llama-3.1-8B-shaped KV cache (64 cache tensors: K and V of 32 layers, 8 KV heads of 128,
bf16, 16-token blocks: 2 MiB a block). A producer process (this script, ``_producer``) fills
MIB (200) of blocks with seeded random bytes on its device, saves them into its block store
(``save_kv``, waited for) and serves them; this process's consumer loads them into its cache
three times: in the step (``start_load_kv`` "loads"), again, and in the background (the loader
thread; timed until ``get_finished_loads`` reports it). Each line: ``load 200 MiB in 81 ms =
2.59 GB/s`` (GB: 1e9 bytes; the device copies included, timed to a device sync), then whether
the bytes equal the producer's. The producer prints its resident memory once idle (its store
made its memory ahead) and its saves' times (into fresh store memory, then into reused).
KV_AHEAD: the producer's ``store_ahead_bytes``: ``store`` (default: its whole store made
ahead, the fast path: every save into memory touched before), ``default`` (the connector's
default: 64 MiB, growing as saves outrun it), or bytes. ``--profile``:
cProfile's top functions of the consumer's first load (every thread's, via ``threading``'s
profile hook: the fetches run on the reader pool). KV_THREADS=N: io_threads (default min(8,
cores)).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import torch

from tessellm.backends.reference.kv_transfer import swap_blocks
from tessellm.kv_transfer import KVConnectorContext, KVConnectorRole
from tessellm.kv_transfer.config import parse_kv_transfer_config
from tessellm.kv_transfer.zmq_peer import ZmqPeerConnector

LAYERS, HEADS, DIM, BS = 32, 8, 128, 16
BLOCK_BYTES = 2 * LAYERS * BS * HEADS * DIM * 2


def _caches(n: int, device, fill: bool) -> list:
    out = []
    for i in range(2 * LAYERS):
        c = torch.zeros(n, BS, HEADS, DIM, dtype=torch.bfloat16, device=device)
        if fill:
            c.view(torch.int16).random_(generator=torch.Generator(device).manual_seed(i))
        out.append(c)
    return out


def _connector(role: str, extra: dict, caches, device):
    if os.environ.get("KV_THREADS"):
        extra["io_threads"] = int(os.environ["KV_THREADS"])
    config = parse_kv_transfer_config({"kv_connector": "ZmqPeerConnector", "kv_role": role,
                                       "kv_connector_extra_config": extra})
    conn = ZmqPeerConnector(config, KVConnectorRole.WORKER,
                            KVConnectorContext(BS, "bench", rank_block_bytes=[BLOCK_BYTES]))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    conn.register_kv_caches(caches, swap_blocks, sync, device)
    return conn, sync


def _keys(n: int) -> list:
    return [f"{i:064x}" for i in range(n)]


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _producer(n: int, port: int, device) -> None:
    caches = _caches(n, device, fill=True)
    store_bytes = (n + 1) * (BLOCK_BYTES + 4096)
    extra = {"kv_port": port, "store_bytes": store_bytes}
    ahead = os.environ.get("KV_AHEAD", "store")
    if ahead != "default":
        extra["store_ahead_bytes"] = store_bytes if ahead == "store" else int(ahead)
    before = _resident()
    conn, sync = _connector("kv_producer", extra, caches, device)
    sync()
    store, deadline = conn._store, time.monotonic() + 30
    while len(store.free) * store.slot_bytes < store.ahead and time.monotonic() < deadline:
        time.sleep(0.05)  # an engine's store makes its memory ahead while the model loads
    time.sleep(0.2)
    print(f"producer: idle, resident +{(_resident() - before) / 2**20:.0f} MiB "
          f"(store {store_bytes / 2**20:.0f} MiB, {len(store.slots) * store.slot_bytes / 2**20:.0f}"
          f" MiB made ahead; KV_AHEAD={ahead})", flush=True)
    for run in ("new", "again"):  # its memory touched for the first time, then reused
        if run == "again":
            conn._store.drop(_keys(n))
        t0 = time.perf_counter()
        conn.save_kv({"saves": [[k, i] for i, k in enumerate(_keys(n))], "wait": True})
        conn.wait_for_save()
        dt = time.perf_counter() - t0
        print(f"producer: saved {n * BLOCK_BYTES / 2**20:.0f} MiB into its store ({run}) in "
              f"{dt * 1e3:.0f} ms = {n * BLOCK_BYTES / dt / 1e9:.2f} GB/s", flush=True)
    print("READY", flush=True)
    sys.stdin.readline()
    conn.shutdown()


def main() -> None:
    args = sys.argv[1:]
    device = torch.device(args[args.index("--device") + 1] if "--device" in args else "cpu")
    mib = float(next((a for a in args if a[0].isdigit()), 200))
    n = max(1, int(mib * 2**20) // BLOCK_BYTES)
    total = n * BLOCK_BYTES
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "_producer", str(n), str(port), str(device)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            print(line.rstrip(), flush=True)
            if line.startswith("READY"):
                break
        else:
            raise SystemExit(f"the producer process ended ({proc.wait()}) before it was ready")
        want = _caches(n, device, fill=True)
        caches = _caches(n, device, fill=False)
        conn, sync = _connector("kv_consumer", {"kv_peer": f"127.0.0.1:{port}"}, caches, device)
        keys = _keys(n)
        print(f"{n} blocks of {BLOCK_BYTES >> 20} MiB on {device}, io_threads {conn.io_threads}",
              flush=True)

        def load():
            failed = conn.start_load_kv({"loads": [["r", [[k, i] for i, k in enumerate(keys)]]]})
            sync()
            return failed

        def load_background():
            conn.start_load_kv({"async_loads": [["b", [[k, i] for i, k in enumerate(keys)]]]})
            done = {}
            while not done:
                done = conn.get_finished_loads(["b"], timeout=60)
            return [] if done["b"] else ["b"]

        for run, fn in (("load", load), ("load again", load), ("load background", load_background)):
            for c in caches:
                c.zero_()
            sync()
            profile = "--profile" in args and run == "load"
            if profile:
                import cProfile
                import threading

                pr = cProfile.Profile()
                threading.setprofile(lambda *a: pr.enable())
                pr.enable()
            t0 = time.perf_counter()
            failed = fn()
            dt = time.perf_counter() - t0
            if profile:
                threading.setprofile(None)
                pr.disable()
                import pstats

                pstats.Stats(pr).sort_stats("tottime").print_stats(14)
            equal = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(caches, want))
            print(f"{run}: {total / 2**20:.0f} MiB in {dt * 1e3:.0f} ms = {total / dt / 1e9:.2f} GB/s"
                  f"{'' if not failed else f'; FAILED {failed}'}; bytes "
                  f"{'equal' if equal else 'DIFFER'}", flush=True)
        conn.shutdown()
    finally:
        proc.stdin.close()
        proc.wait(60)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_producer"]:
        _producer(int(sys.argv[2]), int(sys.argv[3]), torch.device(sys.argv[4]))
    else:
        main()
