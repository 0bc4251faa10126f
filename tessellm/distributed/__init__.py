"""Tensor and pipeline parallelism: process groups, collectives, and the workers that use them.

The names below import torch when first used, not with the package: ``tessellm serve`` imports
``tessellm.distributed.spawn`` first thing, to start the forkserver while it imports the rest."""

__all__ = ["ParallelConfig", "PipelineStage", "TensorParallel", "init_distributed"]


def __getattr__(name):
    if name in __all__:
        from tessellm.distributed import parallel_state

        return getattr(parallel_state, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
