"""Plugin modules built from source text in tests, the way a plugin author writes one."""

from __future__ import annotations

import textwrap
import types


def auto_device() -> str:
    """What ``--device=auto`` picks on this machine among the in-tree backends: cuda where an
    NVIDIA GPU is visible (rocm on a ROCm build of torch), else cpu (CI, no GPU)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "rocm" if getattr(torch.version, "hip", None) else "cuda"


def make_plugin(name: str, source: str) -> types.ModuleType:
    """A plugin module from source text (the way a plugin author writes one)."""
    module = types.ModuleType(name)
    header = "from tessellm.backends.spec import *\nfrom tessellm.backends.spec import hookimpl\n"
    exec(compile(header + textwrap.dedent(source), f"<plugin {name}>", "exec"), module.__dict__)
    return module


def registry_with_old_cpu_kernel(flag: str):
    """A registry whose cpu attention kernel is a plugin's written before the API that added
    ``flag``: the reference kernel, named ``old``, declaring ``flag`` False (a model that needs
    the feature is refused at load, naming ``flag``)."""
    from tessellm.backends.registry import BackendRegistry

    name = f"oldattn_{flag}"
    old = make_plugin(name, f"""
        TESSELLM_OVERRIDES = ("cpu",)
        from tessellm.backends.reference.attention import ReferenceAttentionKernel
        class Old(ReferenceAttentionKernel):
            name = "old"
            {flag} = False
        @hookimpl(tryfirst=True)
        def tessellm_attention_kernel(backend, spec):
            return Old(spec.sliding_window) if backend.name == "cpu" else None
    """)
    return BackendRegistry(plugins=[(name, old)])
