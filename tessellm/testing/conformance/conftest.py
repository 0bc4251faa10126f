"""Makes the suite's fixtures resolvable even when the plugin was not passed with ``-p`` (the
options then keep their defaults: backend cpu, no emulation)."""

from tessellm.testing.plugin import target, tiny_llama_dir  # noqa: F401
