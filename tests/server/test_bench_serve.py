"""`tessellm bench serve` against the real server: every request completes, figures are sane."""

from __future__ import annotations

import argparse
import json

from tessellm.entrypoints import bench_serve


def test_bench_serve_smoke(server, tmp_path):
    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--base-url", server.url, "--api-key", server.api_key, "--num-prompts", "4",
                              "--input-len", "16", "--output-len", "6", "--request-rate", "20",
                              "--seed", "1", "--passes", "2", "--output-json", str(out)])
    assert bench_serve.run(args) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["total_output_tokens"] == 4 * 6
    assert result["model"] == "SmolLM2-135M-Instruct"
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        assert 0 < result[key]["p50"] <= result[key]["p99"]
    assert result["request_throughput"] > 0 and result["output_throughput"] > 0
    # Two passes on the same server, each reported; the result is the last one's.
    assert [p["failed"] for p in result["passes"]] == [0, 0]
    assert result["passes"][-1]["ttft_ms"] == result["ttft_ms"]
