"""tessellm's histogram bucket upper bounds (``+Inf`` is added by prometheus_client); vLLM's,
for the ``vllm:`` names, are in ``tessellm.metrics.vllm_buckets``."""

from __future__ import annotations

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 80.0)
REQUEST_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3840.0)
ITERATION_TOKEN_BUCKETS = tuple(float(1 << i) for i in range(15))  # 1 .. 16384
N_PARAM_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)  # the n parameter: vLLM's bounds, tessellm's too


def one_two_five_buckets(limit: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the first value >= ``limit``."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            buckets.append(float(m * scale))
            if m * scale >= limit:
                return tuple(buckets)
        scale *= 10
