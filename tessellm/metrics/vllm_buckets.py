"""vLLM's histogram bucket bounds, for the ``vllm:`` names of tessellm's histograms.

A dashboard or recording rule written for vLLM picks buckets by their ``le`` value
(``histogram_quantile`` over ``vllm:time_to_first_token_seconds_bucket``, an SLO rule on
``le="0.25"``); it works on tessellm only if the ``vllm:`` series carry vLLM's bounds. The
``tessellm:`` series keep tessellm's own (finer at the low end); under ``metrics_names=both``
each such histogram is observed twice, once per set of bounds (``EngineMetrics``).

The values are vLLM v1's defaults (``vllm/v1/metrics/loggers.py``; locked by vLLM's own
snapshot test of its default buckets), keyed by tessellm's family name (no prefix).
"""

from __future__ import annotations

VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                     5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                                40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
VLLM_ITERATION_TOKEN_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
                                4096.0, 8192.0, 16384.0)

VLLM_N_PARAM_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)


def vllm_1_2_5_buckets(max_value: int) -> tuple[float, ...]:
    """vLLM's ``build_1_2_5_buckets``: 1, 2, 5, 10, 20, 50, ... while <= ``max_value``
    (tessellm's ``one_two_five_buckets`` goes one bound past the limit instead)."""
    from tessellm.metrics.buckets import one_two_five_buckets

    return tuple(b for b in one_two_five_buckets(max_value) if b <= max_value)


def vllm_buckets(max_model_len: int) -> dict[str, tuple[float, ...]]:
    """tessellm histogram family (no prefix) -> vLLM's bounds for its ``vllm:`` name."""
    tokens = vllm_1_2_5_buckets(max_model_len)
    latency = VLLM_REQUEST_LATENCY_BUCKETS
    return {"time_to_first_token_seconds": VLLM_TTFT_BUCKETS,
            "inter_token_latency_seconds": VLLM_ITL_BUCKETS,
            "request_time_per_output_token_seconds": VLLM_ITL_BUCKETS,
            "e2e_request_latency_seconds": latency,
            "request_queue_time_seconds": latency,
            "request_prefill_time_seconds": latency,
            "request_decode_time_seconds": latency,
            "request_inference_time_seconds": latency,
            "iteration_tokens_total": VLLM_ITERATION_TOKEN_BUCKETS,
            "request_params_n": VLLM_N_PARAM_BUCKETS,
            "request_prompt_tokens": tokens,
            "request_generation_tokens": tokens,
            "request_params_max_tokens": tokens,
            "request_max_num_generation_tokens": tokens,
            "request_prefill_kv_computed_tokens": tokens}
