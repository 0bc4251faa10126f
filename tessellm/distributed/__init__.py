"""Tensor and pipeline parallelism: process groups, collectives, and the workers that use them."""

from tessellm.distributed.parallel_state import (ParallelConfig, PipelineStage, TensorParallel,
                                                 init_distributed)

__all__ = ["ParallelConfig", "PipelineStage", "TensorParallel", "init_distributed"]
