"""Plugin modules built from source text in tests, the way a plugin author writes one."""

from __future__ import annotations

import textwrap
import types


def make_plugin(name: str, source: str) -> types.ModuleType:
    """A plugin module from source text (the way a plugin author writes one)."""
    module = types.ModuleType(name)
    header = "from tessellm.backends.spec import *\nfrom tessellm.backends.spec import hookimpl\n"
    exec(compile(header + textwrap.dedent(source), f"<plugin {name}>", "exec"), module.__dict__)
    return module
