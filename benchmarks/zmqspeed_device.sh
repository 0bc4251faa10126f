#!/usr/bin/env bash
# KV connectors' transfer speed after session 21's zmqspeed work (docs/kv_transfer.md, "Over
# TCP" and "Saves"), one GPU, ~6 minutes (at most 8):
#   1. io: ZmqPeerConnector's worker halves alone, two processes over loopback TCP, 1 GiB of
#      Llama-3.1-8B-shaped blocks (benchmarks/kvpeer_io.py --device cuda): the producer's save
#      into its store (fresh memory, then reused slots), the consumer's load in the step,
#      again, and in the background, GB/s, bytes compared;
#   2. peer: Llama-3.1-8B dummy weights, bf16, a producer engine in a second process prefills
#      two 8000-token prompts (its response waits for its store) and serves their KV; this
#      process's consumer loads each (TTFT, GB/s) and recomputes a third (kvconn_gpu.py peer);
#   3. ttft: SharedStorageConnector, 8000 tokens: recompute vs producer vs consumer, TTFT timed
#      at the step that returns the token, the producer's files' landing after it printed.
# Run from the repository root: bash benchmarks/zmqspeed_device.sh   (OUT=... for the logs)
# Expect (session 21 before: peer consumer TTFT 1383 / 1639 ms at 0.76 / 0.64 GB/s vs 232 ms
# recomputed, peer producer 1057 ms; SharedStorage producer "410 ms" timed at LLM.generate):
#   io: "load: 1024 MiB in ... GB/s; bytes equal" at several GB/s (>= 3), "producer: saved ...
#   (again)" several GB/s; peer: "PEER consumer load 1/2: TTFT" near or below the recompute
#   (~200-350 ms), the producer runs well under 1057 ms, "PEER first tokens equal the
#   producer's"; ttft: "TTFT kv_producer run 1/2" within ~20 ms of "TTFT None" (the files
#   written ~150-200 ms after it), the consumer's below the recompute.
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t io ${IO_S:-60} python3 benchmarks/kvpeer_io.py ${IO_MIB:-1024} --device cuda
grep -E "GB/s|blocks of" "$OUT/io.txt"
t peer ${PEER_S:-270} python3 benchmarks/kvconn_gpu.py peer ${PEER_TOKENS:-8000}
grep -E "PEER|connector" "$OUT/peer.txt"
t ttft ${TTFT_S:-150} python3 benchmarks/kvconn_gpu.py ttft ${TTFT_TOKENS:-8000}
grep -E "TTFT|connector" "$OUT/ttft.txt"
