"""Counting the aten ops a piece of code runs (``with AtenOps() as ops: ...``; ``ops.ops``: a
Counter by op name), for tests that pin how many device operations a hot path launches."""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# ops that only make views or read metadata: free of device work, never counted
VIEWS = {"select", "slice", "view", "alias", "as_strided", "detach", "unsqueeze", "squeeze"}


class AtenOps(TorchDispatchMode):
    """The aten ops run inside, by name, views (``VIEWS``) left out."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))
