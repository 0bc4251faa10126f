"""Engine metrics: what the core counts (``stats``), and their Prometheus export (``prometheus``).

``tessellm.metrics.stats`` is plain Python (the core process imports it); the Prometheus side
lives in ``tessellm.metrics.prometheus`` and is imported only by front ends that export it.
See docs/metrics.md for every metric and what it means.
"""
