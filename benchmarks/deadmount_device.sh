#!/usr/bin/env bash
# ZmqPeerConnector after session 22's deadmount work (docs/kv_transfer.md, "Over TCP"), one GPU,
# ~6.5 minutes (at most 8):
#   1. io: the worker halves alone, two processes over loopback TCP, 1 GiB of Llama-3.1-8B-shaped
#      blocks (benchmarks/kvpeer_io.py --device cuda): the consumer's loads now pipelined across
#      staging chunks (the next 256 MiB chunk's reads queued before this one's copy); the
#      producer's whole store made ahead (KV_AHEAD=store: the fast path, as session 21's);
#   2. io-window: the same with the producer's default store_ahead_bytes (64 MiB made ahead at
#      start, doubling as saves outrun it): its idle resident memory and its first (new) save;
#   3. peer: Llama-3.1-8B dummy weights, a producer engine (default window, wait_for_save) in a
#      second process prefills two 8000-token prompts; this process's consumer loads each (TTFT).
# Run from the repository root: bash benchmarks/deadmount_device.sh   (OUT=... for the logs)
# Expect (today's H100 before this change: consumer TTFT 182-202 ms at 5.2-5.8 GB/s, recompute
# 228 ms): io "load: 1024 MiB ... GB/s; bytes equal" at or above 5 GB/s (the pipeline removes
# a barrier per 256 MiB chunk), "bytes equal" on every line; io-window "producer: idle,
# resident +~64 MiB" (was +1024 MiB) and its "(new)" save slower than io's (page faults
# past the 64 MiB window), "(again)" as io's; peer: "PEER consumer load 1/2: TTFT" at or below
# 182-202 ms, "PEER producer run 1" possibly ~100-300 ms above run 2 (its first 1 GiB of saves
# faults its store's pages in: the window grows during it), "PEER first tokens equal".
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t io ${IO_S:-60} python3 benchmarks/kvpeer_io.py ${IO_MIB:-1024} --device cuda
grep -E "GB/s|blocks of|idle" "$OUT/io.txt"
t io-window ${IO_S:-60} env KV_AHEAD=default python3 benchmarks/kvpeer_io.py ${IO_MIB:-1024} --device cuda
grep -E "GB/s|idle" "$OUT/io-window.txt"
t peer ${PEER_S:-270} python3 benchmarks/kvconn_gpu.py peer ${PEER_TOKENS:-8000}
grep -E "PEER|connector" "$OUT/peer.txt"
