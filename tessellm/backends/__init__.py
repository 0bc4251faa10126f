"""Hardware backends: the plugin contract (spec), the registry, and the in-tree plugins."""
