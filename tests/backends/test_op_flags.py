"""The one rule of optional capability flags (``kernels/op_flags.py``, docs/plugins.md): a
subclass of an in-tree ops base that defines one of a flag's ops itself, without setting the
flag in its own body, gets the flag off, so the engine never hands its op a variant's keywords
it never declared; every other flag, and every in-tree backend's ops, keep what they declare."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import tessellm
from tessellm.kernels import op_flags

# (module, class, the table its __init_subclass__ applies)
BASES = [
    ("tessellm.backends.reference.ops", "ReferenceOps", op_flags.FUSED_OPS_FLAGS),
    ("tessellm.kernels.fused_ops", "TritonOps", op_flags.FUSED_OPS_FLAGS),
    ("tessellm.backends.reference.lora", "ReferenceLoRAOps", op_flags.LORA_OPS_FLAGS),
    ("tessellm.kernels.lora", "TritonLoRAOps", op_flags.LORA_OPS_FLAGS),
    ("tessellm.backends.reference.quant_ops", "TorchQuantOps", op_flags.QUANT_OPS_FLAGS),
    ("tessellm.kernels.gemm.quant_ops", "TritonQuantOps", op_flags.QUANT_OPS_FLAGS),
]
# in-tree subclasses a backend serves: (module, class, base module, base class)
IN_TREE = [
    ("tessellm.backends.cpu.ops", "CpuOps", "tessellm.backends.reference.ops", "ReferenceOps"),
    ("tessellm.backends.tpu.ops", "XlaOps", "tessellm.backends.reference.ops", "ReferenceOps"),
    ("tessellm.backends.xpu.ipex_ops", "IpexOps", "tessellm.backends.reference.ops",
     "ReferenceOps"),
    ("tessellm.backends.cuda.ops", "CudaOps", "tessellm.kernels.fused_ops", "TritonOps"),
]


def _load(module, name):
    if module.startswith("tessellm.kernels.") or module.endswith("cuda.ops"):
        pytest.importorskip("triton")
    return getattr(importlib.import_module(module), name)


def _op(self, *args, **kwargs):  # a replacement op: its body never runs here
    raise AssertionError("not called")


@pytest.mark.parametrize("module,name,table", BASES, ids=[b[1] for b in BASES])
def test_a_subclass_replacing_an_op_loses_exactly_that_ops_flags(module, name, table):
    """For every op of the table: a subclass defining it (a method or a staticmethod) has each
    flag describing that op off and every other flag as the base declares; one that also sets
    the flag keeps its own value, and so does a subclass of it that replaces nothing, while
    one below it that replaces the op again without saying so loses it again."""
    base = _load(module, name)
    ops = sorted({op for flag_ops, _ in table.values() for op in flag_ops})
    for op in ops:
        for body in ({op: _op}, {op: staticmethod(_op)}):
            sub = type(f"Own_{op}", (base,), dict(body))
            for flag, (flag_ops, off) in table.items():
                want = off if op in flag_ops else getattr(base, flag, off)
                assert getattr(sub, flag, off) == want, (name, op, flag)
        for flag, (flag_ops, off) in table.items():
            if op not in flag_ops:
                continue
            declared = type("Declared", (base,), {op: _op, flag: "declared"})
            assert declared.__dict__[flag] == "declared"
            assert getattr(type("Below", (declared,), {}), flag) == "declared"
            again = type("Again", (declared,), {op: _op})
            assert getattr(again, flag) == off, (name, op, flag)
    # a subclass replacing no op of the table keeps every flag (an op outside the table too)
    plain = type("Plain", (base,), {"name": "plain", "some_other_op": _op})
    for flag, (_, off) in table.items():
        assert getattr(plain, flag, off) == getattr(base, flag, off)


@pytest.mark.parametrize("module,name,base_module,base_name", IN_TREE,
                         ids=[c[1] for c in IN_TREE])
def test_in_tree_ops_keep_their_capabilities(module, name, base_module, base_name):
    """The cpu / tpu / xpu / cuda ops replace MoE (and other) ops of their base and declare
    what theirs take: each serves every flag of the table its base does."""
    cls = _load(module, name)
    base = _load(base_module, base_name)
    for flag, (_, off) in op_flags.FUSED_OPS_FLAGS.items():
        assert getattr(cls, flag, off) == getattr(base, flag, off), (name, flag)


@pytest.mark.parametrize("module,name,table", BASES, ids=[b[1] for b in BASES])
def test_every_declaration_of_a_base_is_in_the_table(module, name, table):
    """A flag a base declares (a bool or a tuple of kinds) is tied to its ops in the table, or
    is an op family's declaration that a subclass replacing one op of the family keeps
    (``op_flags.FAMILY_FLAGS``): a new flag added to a base without a table row fails here.
    And the contract (``backends/spec.py``) names each flag of the table."""
    base = _load(module, name)
    for attr in dir(base):
        value = getattr(base, attr)
        if attr.startswith("_") or callable(value):
            continue
        if isinstance(value, bool) or (isinstance(value, tuple) and attr.startswith("fused_")):
            assert attr in table or attr in op_flags.FAMILY_FLAGS, (name, attr)
    spec = (Path(tessellm.__file__).parent / "backends" / "spec.py").read_text()
    for flag in table:
        assert re.search(rf"\b{flag}\b", spec), flag
