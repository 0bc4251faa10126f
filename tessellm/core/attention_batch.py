"""The per-step attention inputs: the contract owns the type (``tessellm.backends.spec``);
re-exported here for the engine's modules."""

from tessellm.backends.spec import AttentionBatch

__all__ = ["AttentionBatch"]
