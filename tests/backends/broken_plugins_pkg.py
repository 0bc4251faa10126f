"""Sources of ``tessellm-broken-plugins``, a real package (pyproject + entry points) holding the
careless plugins of issue 16, one entry point each. ``build(dir)`` writes it; tests install it
with ``pip install --no-deps --target`` and run tessellm in a subprocess that finds it."""

from __future__ import annotations

import os
import textwrap

# A kernel that computes the right attention (the cpu backend's), then spoils its result.
_SPOILED = """
    import torch
    from tessellm.backends.cpu.attention import CpuAttentionKernel
    from tessellm.backends.spec import Backend, hookimpl

    NAME = {name!r}

    class Spoiled(CpuAttentionKernel):
        name = NAME

        def forward(self, q, k, v, k_cache, v_cache, metadata, scale, **kw):
            out = super().forward(q, k, v, k_cache, v_cache, metadata, scale, **kw)
            return {spoil}

    @hookimpl
    def tessellm_register_backends(register):
        register(Backend(name=NAME, device_type="cpu", dist_backend="gloo", priority=-50,
                         is_available=lambda: True))

    @hookimpl
    def tessellm_attention_kernel(backend, spec):
        return Spoiled(spec) if backend.name == NAME else None
"""

# A kernel that declares fuses_rotary but attends over the unrotated q and k.
_NO_ROTARY = _SPOILED.replace("name = NAME\n", "name = NAME\n        fuses_rotary = True\n").replace(
    "super().forward(q, k, v, k_cache, v_cache, metadata, scale, **kw)",
    "super().forward(q, k, v, k_cache, v_cache, metadata, scale)")

# A tryfirst hook that forgets to check backend.name, so it answers for cpu too.
_TAKEOVER = """
    from tessellm.backends.cpu.attention import CpuAttentionKernel
    from tessellm.backends.spec import hookimpl
    {declare}

    class Mine(CpuAttentionKernel):
        name = "mine"

    @hookimpl(tryfirst=True)
    def tessellm_attention_kernel(backend, spec):
        return Mine(spec)
"""

MODULES = {
    # 1. wrong layout, same number of elements: [heads, tokens, head_size] read as [tokens, ...]
    "layout": _SPOILED.format(name="badlayout",
                              spoil="out.transpose(0, 1).contiguous().view(out.shape)"),
    # 1. a wrong shape and a wrong dtype
    "shape": _SPOILED.format(name="badshape", spoil="out.transpose(0, 1).contiguous()"),
    "dtype": _SPOILED.format(name="baddtype", spoil="out.double()"),
    "norotary": _NO_ROTARY.format(name="norotary", spoil="out"),
    # 2. silent takeover of cpu, and the same plugin declaring its override
    "takeover": _TAKEOVER.format(declare=""),
    "override": _TAKEOVER.format(declare='TESSELLM_OVERRIDES = ("cpu",)'),
    # 3. plugins that fail to load
    "importerror": "import tessellm_no_such_module\n",
    "futureapi": """
        from tessellm.backends.spec import Backend, hookimpl
        TESSELLM_PLUGIN_API_REQUIRED = 99
        @hookimpl
        def tessellm_register_backends(register):
            register(Backend(name="futureapi", device_type="cpu", dist_backend="gloo",
                             priority=-50, is_available=lambda: True))
    """,
    "typo": """
        from tessellm.backends.spec import Backend, hookimpl
        @hookimpl
        def tessellm_register_backends(register):
            register(Backend(name="typo", device_type="cpu", dist_backend="gloo", priority=-50,
                             is_available=lambda: True))
        @hookimpl
        def tessellm_atention_kernel(backend, spec):  # misspelled: no such hook
            return None
    """,
    "dupcpu": """
        from tessellm.backends.spec import Backend, hookimpl
        @hookimpl
        def tessellm_register_backends(register):
            register(Backend(name="cpu", device_type="cpu", dist_backend="gloo", priority=99,
                             is_available=lambda: True))
    """,
}
# entry-point name -> module; the entry-point name is also the backend name where it has one
ENTRY_POINTS = {"badlayout": "layout", "badshape": "shape", "baddtype": "dtype",
                "norotary": "norotary",
                "takeover": "takeover", "override": "override", "importerror": "importerror",
                "futureapi": "futureapi", "typo": "typo", "dupcpu": "dupcpu"}
LOAD_FAILURES = ("importerror", "futureapi", "typo", "dupcpu")


def build(root: str) -> str:
    """Write the package's source tree under ``root``; returns its directory."""
    pkg = os.path.join(root, "tessellm-broken-plugins")
    os.makedirs(os.path.join(pkg, "tessellm_broken"))
    eps = "\n".join(f'{ep} = "tessellm_broken.{mod}"' for ep, mod in ENTRY_POINTS.items())
    with open(os.path.join(pkg, "pyproject.toml"), "w") as f:
        f.write(textwrap.dedent("""\
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "tessellm-broken-plugins"
            version = "0.1.0"

            [project.entry-points."tessellm.backends"]
            """) + eps + '\n\n[tool.setuptools]\npackages = ["tessellm_broken"]\n')
    open(os.path.join(pkg, "tessellm_broken", "__init__.py"), "w").close()
    for mod, src in MODULES.items():
        with open(os.path.join(pkg, "tessellm_broken", f"{mod}.py"), "w") as f:
            f.write(textwrap.dedent(src))
    return pkg
