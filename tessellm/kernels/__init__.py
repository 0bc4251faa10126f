"""Portable Triton kernels that any backend may use.

The rule of this package: tensors and plain Python values in, tensors out. A kernel module here
imports neither ``tessellm.backends`` nor ``tessellm.core`` (``tests/backends/test_import_rules.py``
checks it), so a backend plugin (in-tree or third-party) can build on it without reaching into
the engine or into another backend. The objects that implement the contract's protocols on top
of these kernels (``TritonAttentionKernel``, ``TritonOps``, ``TritonQuantOps``) live here too: they
satisfy the protocols structurally and import nothing of the contract.

One concept a file: ``attention/`` (cache write, prefill, split-KV decode, the shared tile),
``gemm/`` (GEMV, weight-only and W8A8 GEMMs), ``norm``, ``rotary``, ``activation``, ``pdl``
(programmatic dependent launch); ``moe/``, ``bitmask`` and ``lora/`` as the wave-2 features land.
"""
