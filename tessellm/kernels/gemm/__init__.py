"""GEMMs in Triton: the skinny GEMV for decode (``gemv``, ``gemv_x2``, ``w8a8``), the
weight-only GEMMs that widen int8/int4/e4m3 weights inside the tile (``weight_only``), the fp8
W8A8 path for prefill (``fp8``), and ``TritonQuantOps``, the contract's ``QuantOps`` on them
(``quant_ops``); ``gemv_norm``, the add-RMSNorm folded into the one-row GEMV, is a measured
experiment the engine does not use (slower on an H200); ``decode_gemm``, a tile GEMM for
decode-sized row counts with an optional SiLU-and-mul epilogue, is taken only under
``TESSELLM_DECODE_GEMM`` until its GPU timing decides."""
