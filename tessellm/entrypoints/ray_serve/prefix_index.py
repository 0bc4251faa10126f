"""Re-export: ``PrefixIndex`` lives in ``tessellm.core.prefix_index`` (the data-parallel
balancer in the engine uses it too, and the engine does not import the Ray Serve layer)."""

from tessellm.core.prefix_index import PrefixIndex

__all__ = ["PrefixIndex"]
