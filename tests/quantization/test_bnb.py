"""bitsandbytes checkpoints (``quantization/bnb.py``, ``bnb_method.py``), made by the real library
(HF transformers' ``BitsAndBytesConfig`` on the CPU, ``bnb_checkpoint.py``):

* the format: our dequantization equals ``bitsandbytes.functional.dequantize_4bit`` (nf4, fp4,
  with and without double quantization), and ``quantize_bnb4`` (the conformance suite's plain
  torch quantizer) gives bitsandbytes' values;
* the Triton dequantization kernel (the cuda/rocm ``bnb4_mm``) against the torch reference, bit
  for bit, and its product (interpreted on the CPU where there is no GPU);
* tiny random Llama models saved in bnb 4-bit and 8-bit give, on the cpu backend (float32), the
  greedy tokens of the same models from the dequantized checkpoint, served by tessellm and by HF
  transformers; the 4-bit layers hold the stored codes (4 bits a weight), nothing dense; the
  cuda backend's kernels give them too (interpreted);
* ``quantization="bitsandbytes"`` on the dense checkpoint quantizes as transformers does (the
  same codes, the same tokens); tensor parallelism: 4-bit and 8-bit ranks hold their rows /
  columns (4-bit: whole blocks), two cpu workers generate as one device, a split off the
  blocks is refused;
* bad input refused with one sentence naming the fix.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tessellm.backends.reference.quant_ops import TorchQuantOps
from tessellm.quantization.bnb import (Bnb4Weight, dequantize_bnb4, quant_state, quantize_bnb4,
                                       widen_absmax)
from tessellm.quantization.loading import quantized_linears
from tests.gpu_set import ON_GPU, gpu_when_present
from tests.quantization.block_fp8_checkpoint import build, generate

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 7, 7], list(range(40, 80)), [200, 12]]
MAX_NEW = 10
FORMS = [dict(bits=4, quant_type="nf4", double_quant=True),
         dict(bits=4, quant_type="nf4", double_quant=False),
         dict(bits=4, quant_type="fp4", double_quant=True),
         dict(bits=4, quant_type="fp4", double_quant=False),
         dict(bits=8)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Made by the bitsandbytes package (the ``[test]`` extra); skipped without it."""
    pytest.importorskip("bitsandbytes")
    from transformers import GPTNeoXConfig, LlamaConfig, Phi3Config

    from tests.conftest import TINY_COMMON, _tiny_configs
    from tests.quantization.bnb_checkpoint import bnb_maker

    tiny = _tiny_configs()
    more = {"phi3": lambda: Phi3Config(**TINY_COMMON, tie_word_embeddings=False, pad_token_id=0,
                                       eos_token_id=2, bos_token_id=1),
            # every rank's inputs whole blocks of 64 at T=2 (o_proj 128, down_proj 256)
            # q/k/v fused per head in query_key_value (64 inputs a row: whole blocks)
            "gpt-neox": lambda: GPTNeoXConfig(**{k: v for k, v in TINY_COMMON.items()
                                                 if k != "num_key_value_heads"},
                                              pad_token_id=0, bos_token_id=1, eos_token_id=2),
            "llama-wide": lambda: LlamaConfig(**dict(TINY_COMMON, hidden_size=128,
                                                     intermediate_size=256),
                                              tie_word_embeddings=False, initializer_range=0.1)}
    return bnb_maker(tmp_path_factory.mktemp("bnb"),
                     lambda arch: more[arch]() if arch in more else tiny[arch], seed=1234)


def _library_quantized(w: torch.Tensor, quant_type: str, double_quant: bool, blocksize=64):
    """bitsandbytes' own quantization of ``w``: (its dequantized weight, our segment of it)."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    q, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                            compress_statistics=double_quant)
    saved = state.as_dict(packed=True)
    parts = {k.split(".")[0]: v for k, v in saved.items()}  # quant_state.bitsandbytes__nf4
    meta = quant_state(parts["quant_state"], "w")
    n, k = meta["shape"]
    seg = Bnb4Weight(q.reshape(n, k // 2), widen_absmax(parts, meta, "w"), parts["quant_map"],
                     meta["blocksize"])
    return bnb_functional.dequantize_4bit(q, state), seg


# -- the format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((48, 64), 64), ((40, 192), 64), ((24, 256), 128),
                                             ((300, 128), 64)])
def test_dequantize_equals_bitsandbytes(quant_type, double_quant, shape, blocksize):
    """Our ``code[q] * absmax`` over flat blocks (nested absmax widened as bnb does) is
    bitsandbytes' dequantization bit for bit. (K a multiple of the block: bitsandbytes 0.50.2's
    CPU ``dequantize_4bit`` disagrees with its own ``quantize_4bit`` where a block straddles two
    rows; no released model has such a K.) 300 x 128 / 64 = 600 absmaxes: three nested blocks."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    want, seg = _library_quantized(w, quant_type, double_quant, blocksize)
    assert torch.equal(seg.dequantize(), want)
    rows = slice(5, 17)  # a slab of rows, as the reference op dequantizes them
    assert torch.equal(dequantize_bnb4(seg.qweight[rows], seg.absmax, seg.code, blocksize,
                                       row0=rows.start), want[rows])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_plain_torch_quantizer_gives_bitsandbytes_values(quant_type):
    """``quantize_bnb4`` (the conformance suite's checkpoints) picks the table entry
    bitsandbytes picks, up to values exactly between two entries."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    want, _ = _library_quantized(w, quant_type, False)
    got = quantize_bnb4(w, quant_type).dequantize()
    assert (got != want).float().mean() < 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=0.2 * w.abs().max().item())


# -- the kernel ------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,blocksize", [(40, 64, 64), (33, 96, 64), (7, 200, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@gpu_when_present
def test_triton_dequantize_equals_the_reference(n, k, blocksize, dtype):
    """Blocks straddling rows (96, 200 inputs), a short last block (33 x 96 / 64), every
    nibble and table entry: the kernel's weight is the reference's bit for bit (16-bit: on a
    GPU; the interpreter truncates its cast, one step off), and its product (then cuBLAS, or
    torch on the CPU) the reference op's."""
    from tessellm.kernels.gemm.bnb4 import bnb4_dequantize, bnb4_mm

    g = torch.Generator().manual_seed(n * k)
    w = quantize_bnb4(torch.randn(n, k, generator=g), "nf4", blocksize)
    x = (torch.randn(5, k, generator=g)).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    want_w = w.dequantize(dtype)
    want = TorchQuantOps().bnb4_mm(x, w, bias)
    w = w.to(DEVICE)
    got_w = bnb4_dequantize(w, dtype).cpu()
    if dtype == torch.float32 or DEVICE.type == "cuda":
        assert torch.equal(got_w, want_w)
    else:
        step = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
        torch.testing.assert_close(got_w.float(), want_w.float(), rtol=step, atol=0)
    # 16-bit: a 16-bit GEMM of the rounded weight against the reference's float32 sums
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
    for rows in (1, 3, 5):  # the GEMV (up to GEMV_MAX_M rows), then dequantize + GEMM
        torch.testing.assert_close(bnb4_mm(x[:rows].to(DEVICE), w, bias.to(DEVICE)).cpu(),
                                   want[:rows], rtol=1e-5 if dtype == torch.float32 else 2e-2,
                                   atol=tol)


@pytest.mark.parametrize("n,k,blocksize", [(5, 320, 64), (3, 512, 64), (9, 512, 128)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_tile", [True, False])
@gpu_when_present
def test_bnb4_gemv_rows_read_the_codes_once(n, k, blocksize, with_bias, dtype, x_tile):
    """The decode GEMV at 1, 3, 4 rows (one launch: every row's accumulator against each code
    tile) and 6 (two launches), K of several steps (the interpreter's 2 blocks a step: 320
    leaves a short last step, 512 splits K in two; 4 outputs a program: several programs, the
    last one short), against x @ the float32-dequantized weight
    in float64, x loaded either way (``X_TILE``; the interpreter's launch shape, on a GPU too).
    The GEMV sums ``code * absmax * x`` in float32 in its own order, so float32 is
    held to reassociation: 1e-5 of ``|x| @ |w|`` an output; 16-bit x adds the output's
    rounding (a bf16 step, 2^-7 of it: the interpreter truncates its cast; the weights are not
    rounded one by one, as the dequantized matrix's are)."""
    from tessellm.kernels.gemm import bnb4

    g = torch.Generator().manual_seed(n * k + with_bias)
    w = quantize_bnb4(torch.randn(n, k, generator=g), "nf4", blocksize)
    x = torch.randn(6, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    wf = w.dequantize(torch.float32).double()
    want = x.double() @ wf.t() + (bias.double() if with_bias else 0)
    size = x.double().abs() @ wf.abs().t()
    wd = w.to(DEVICE)
    for rows in (1, 3, 4, 6):
        got = bnb4.bnb4_gemv(x[:rows].to(DEVICE), wd, None if bias is None else bias.to(DEVICE),
                             config=dict(bnb4._INTERPRETED_CONFIG, BLOCK_N=4, X_TILE=x_tile))
        assert got.dtype == dtype and got.shape == (rows, n)
        err = (got.cpu().double() - want[:rows]).abs()
        tol = 1e-5 * size[:rows] + (2 ** -7 * want[:rows].abs() if dtype != torch.float32 else 0)
        assert (err <= tol).all(), (rows, (err / tol).max().item())


def _nested_nf4(n: int, k: int, blocksize: int, g: torch.Generator) -> Bnb4Weight:
    """A double-quantized weight as the loader widens it: 8-bit absmaxes through a 256-entry
    table, a float32 absmax a block of 256 of them and an offset (``widen_absmax``)."""
    w = quantize_bnb4(torch.randn(n, k, generator=g), "nf4", blocksize)
    nb = w.absmax.numel()
    pieces = {"absmax": torch.randint(0, 256, (nb,), generator=g, dtype=torch.uint8),
              "nested_absmax": torch.rand(-(-nb // 256), generator=g) + 0.5,
              "nested_quant_map": torch.linspace(-1, 1, 256)}
    absmax = widen_absmax(pieces, {"nested_blocksize": 256, "nested_offset": 0.25}, "w")
    return Bnb4Weight(w.qweight, absmax, w.code, blocksize)


GEMV_KINDS = [dict(X_WORDS=False, WIDE_Q=False, X_TILE=True, SPLIT_LAST=False),
              dict(X_WORDS=True, WIDE_Q=True, X_TILE=True, SPLIT_LAST=True),
              dict(X_WORDS=True, WIDE_Q=False, X_TILE=False, SPLIT_LAST=False)]


@pytest.mark.parametrize("lut", ["t16", "gather", "pair"])
@pytest.mark.parametrize("kind", GEMV_KINDS, ids=lambda k: "-".join(
    n for n, on in (("words", k["X_WORDS"]), ("q16", k["WIDE_Q"]), ("xt", k["X_TILE"]),
                    ("last", k["SPLIT_LAST"])) if on))
@gpu_when_present
def test_bnb4_gemv_variants_equal_the_reference(lut, kind):
    """Every way the GEMV looks codes up (``LUT``), reads x (as 32-bit words of two 16-bit
    inputs or one by one; tiles or 2-D) and the codes (row stride passed for 16-byte loads),
    split K's planes added by torch or by each tile's last program (``SPLIT_LAST``), gives
    x @ the float32-dequantized weight (float64 sums), within ``rows_read_the_codes_once``'s
    tolerance: NF4 blocks of 64 with a short last step (5 blocks a row, 2 a step) and a bias,
    bf16 x; FP4 blocks of 128, K split in two, twice (the tile counters left for the next
    launch); double-quantized absmaxes, fp16 x; float32 x (no words: one by one)."""
    from tessellm.kernels.gemm import bnb4

    g = torch.Generator().manual_seed(7)
    config = dict(bnb4._INTERPRETED_CONFIG, LUT=bnb4.LUTS[lut], **kind)
    cases = [(quantize_bnb4(torch.randn(5, 320, generator=g), "nf4", 64), torch.bfloat16, 3,
              True),
             (quantize_bnb4(torch.randn(3, 1024, generator=g), "fp4", 128), torch.bfloat16, 2,
              False),
             (_nested_nf4(4, 384, 64, g), torch.float16, 2, False)]
    if kind["X_WORDS"] and kind["X_TILE"]:
        cases.append((quantize_bnb4(torch.randn(3, 192, generator=g), "fp4", 64),
                      torch.float32, 1, True))
    for w, dtype, rows, with_bias in cases:
        n, k = w.out_features, w.in_features
        x = torch.randn(rows, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
        wf = w.dequantize(torch.float32).double()
        want = x.double() @ wf.t() + (bias.double() if with_bias else 0)
        w, args = w.to(DEVICE), (x.to(DEVICE), None if bias is None else bias.to(DEVICE))
        got = bnb4.bnb4_gemv(args[0], w, args[1], config=config)
        assert got.dtype == dtype and got.shape == (rows, n)
        if k == 1024:
            assert bnb4.gemv_config(rows, n, k, 128, True, config=config)["SPLIT_K"] == 2
            assert torch.equal(bnb4.bnb4_gemv(args[0], w, args[1], config=config), got)
        err = (got.cpu().double() - want).abs()
        tol = (1e-5 * (x.double().abs() @ wf.abs().t())
               + (2 ** -7 * want.abs() if dtype != torch.float32 else 0))
        assert (err <= tol).all(), (w.blocksize, dtype, (err / tol).max().item())


@gpu_when_present
def test_bnb4_gemv_words_need_aligned_x():
    """x that does not start on 4 bytes (a view one bf16 into its buffer) is read one input at
    a time whatever the config says: the same product as an aligned copy's."""
    from tessellm.kernels.gemm import bnb4

    g = torch.Generator().manual_seed(8)
    w = quantize_bnb4(torch.randn(3, 128, generator=g), "nf4").to(DEVICE)
    buf = torch.randn(129, generator=g).to(torch.bfloat16).to(DEVICE)
    x = buf[1:].view(1, 128)
    assert x.data_ptr() % 4 != 0
    config = dict(bnb4._INTERPRETED_CONFIG, X_WORDS=True)
    assert torch.equal(bnb4.bnb4_gemv(x, w, config=config),
                       bnb4.bnb4_gemv(x.clone(), w, config=config))


def test_bnb4_pair_table_follows_its_code():
    """``pair_table``: entry b is ``code[b >> 4]``, ``code[b & 15]`` (float32 bits, low word
    first), made once per table and again after an in-place change of it."""
    from tessellm.kernels.gemm.bnb4 import pair_table

    code = quantize_bnb4(torch.randn(2, 64), "fp4").code.clone()
    pairs = pair_table(code)
    assert pair_table(code) is pairs
    b = torch.arange(256)
    assert torch.equal(pairs.view(torch.float32).view(256, 2),
                       torch.stack([code[b >> 4], code[b & 15]], dim=1))
    code.mul_(2)
    assert torch.equal(pair_table(code).view(torch.float32).view(256, 2)[:, 1], code[b & 15])
    with torch.inference_mode():  # weights woken up or reloaded there: no version counter
        made = code.clone()
    assert torch.equal(pair_table(made), pair_table(code))
    with torch.inference_mode():
        made.mul_(2)
    assert torch.equal(pair_table(made).view(torch.float32).view(256, 2)[:, 1], made[b & 15])


@gpu_when_present
def test_bnb4_mm_takes_the_gemv_up_to_its_rows(monkeypatch):
    """With ``GEMV_MAX_M`` set (the sweep's figure), ``bnb4_mm`` gives the GEMV's product up
    to that many rows, the dequantization path's above and for K not whole blocks."""
    from tessellm.kernels.gemm import bnb4

    monkeypatch.setattr(bnb4, "GEMV_MAX_M", 2)
    g = torch.Generator().manual_seed(5)
    w = quantize_bnb4(torch.randn(6, 256, generator=g), "nf4").to(DEVICE)
    odd = quantize_bnb4(torch.randn(6, 200, generator=g), "nf4", 128).to(DEVICE)
    x = torch.randn(3, 256, generator=g).to(DEVICE)
    x_odd = torch.randn(1, 200, generator=g).to(DEVICE)
    assert torch.equal(bnb4.bnb4_mm(x[:2], w), bnb4.bnb4_gemv(x[:2], w))
    deq = torch.nn.functional.linear
    assert torch.equal(bnb4.bnb4_mm(x, w), deq(x, bnb4.bnb4_dequantize(w, x.dtype)))
    assert torch.equal(bnb4.bnb4_mm(x_odd, odd), deq(x_odd, bnb4.bnb4_dequantize(odd, x.dtype)))


def test_bnb4_gemv_needs_whole_blocks_a_row():
    """K not a multiple of the block size: the GEMV refuses, naming the fix; ``bnb4_mm``
    dequantizes such a weight whatever the rows."""
    from tessellm.kernels.gemm import bnb4

    w = quantize_bnb4(torch.randn(7, 200), "nf4", 128)
    with pytest.raises(ValueError, match="multiple of the block size 128; use bnb4_mm"):
        bnb4.bnb4_gemv(torch.randn(1, 200), w)
    assert not bnb4.gemv_fits(w)


# -- models --------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS, ids=lambda f: "-".join(map(str, f.values())))
def test_bnb_checkpoint_serves_its_dequantized_model(checkpoints, form):
    """cpu backend, float32: the bnb checkpoint's greedy tokens are the dequantized
    checkpoint's, served by tessellm and by HF transformers."""
    from tests.conftest import hf_greedy

    bnb_dir, deq_dir = checkpoints("llama", **form)
    got = generate(bnb_dir, PROMPTS, MAX_NEW)
    assert got == generate(deq_dir, PROMPTS, MAX_NEW)
    assert got == hf_greedy(deq_dir, PROMPTS, MAX_NEW)


@pytest.mark.parametrize("form", [FORMS[0], FORMS[-1]], ids=["nf4-dq", "8bit"])
def test_fused_stored_weights_are_cut_with_their_state(checkpoints, form):
    """Phi-3 stores q/k/v and gate/up fused (``qkv_proj``, ``gate_up_proj``); the family cuts
    them into parts, each with its rows of codes and absmaxes (4-bit) or row scales (8-bit):
    the dequantized model's tokens, as HF gives them."""
    from tests.conftest import hf_greedy

    bnb_dir, deq_dir = checkpoints("phi3", **form)
    got = generate(bnb_dir, PROMPTS, MAX_NEW)
    assert got == hf_greedy(deq_dir, PROMPTS, MAX_NEW)


@pytest.mark.parametrize("form", [FORMS[0], FORMS[-1]], ids=["nf4-dq", "8bit"])
def test_per_head_fused_qkv_reordered_with_its_state(checkpoints, form):
    """GPT-NeoX fuses q/k/v per head (``[q_h | k_h | v_h]`` rows) in ``query_key_value``; the
    family gathers each part's rows, codes and absmaxes moving with them (each row whole
    blocks): the dequantized model's tokens, as HF gives them."""
    from tests.conftest import hf_greedy

    bnb_dir, deq_dir = checkpoints("gpt-neox", **form)
    assert generate(bnb_dir, PROMPTS, MAX_NEW) == hf_greedy(deq_dir, PROMPTS, MAX_NEW)


def test_fused_cut_inside_a_block_refused():
    """A part starting inside a block of the flattened weight (3 rows of 40 inputs = 120
    weights, blocks of 64) cannot keep its absmaxes: refused naming the weight."""
    from tessellm.quantization.bnb_stored import StoredBnb

    stored = StoredBnb("model.layers.0.self_attn.qkv_proj.weight",
                       quantize_bnb4(torch.randn(10, 40)))
    with pytest.raises(ValueError, match=r"qkv_proj\.weight .* cannot be cut at row 3"):
        stored.split_rows([3, 7])
    whole = StoredBnb("w", quantize_bnb4(torch.randn(16, 40)))
    parts = whole.split_rows([8, 8])  # 320 = 5 x 64
    assert [p.shape[0] for p in parts] == [8, 8]
    assert [p.shape[0] for p in whole.split([8, 8], dim=0)] == [8, 8]  # Falcon's form
    assert torch.equal(torch.cat([p.seg.dequantize() for p in whole.chunk(2)]),
                       whole.seg.dequantize())
    # other tensor operations: refused in one sentence
    with pytest.raises(AttributeError, match="w is a bitsandbytes-quantized weight, which this "
                                             "model family's loader cuts with unflatten"):
        whole.unflatten(0, (2, 8))
    # GPT-NeoX's per-head q/k/v reorders rows: only rows of whole blocks (40 inputs are not)
    with pytest.raises(ValueError, match=r"^w \(bitsandbytes 4-bit, 40 inputs a row.* per head"):
        whole.take_rows(torch.arange(16).flip(0))
    rows = StoredBnb("w", quantize_bnb4(torch.randn(6, 128)))
    order = torch.tensor([4, 0, 5, 1])
    assert torch.equal(rows.take_rows(order).seg.dequantize(), rows.seg.dequantize()[order])
    assert not hasattr(whole, "qtype")  # probes for other formats stay False


@pytest.mark.interpreted
def test_bnb4_checkpoint_on_the_cuda_kernels(checkpoints):
    """The cuda backend's Triton dequantization (interpreted on host tensors without a GPU)
    gives the dequantized model's tokens; tied embeddings (Qwen3) too."""
    for arch in ("llama", "qwen3"):
        bnb_dir, deq_dir = checkpoints(arch, bits=4, quant_type="nf4", double_quant=True)
        want = generate(deq_dir, PROMPTS[:2], 4)
        assert generate(bnb_dir, PROMPTS[:2], 4, device="cuda", emulate=True) == want


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_bnb4_checkpoint_on_a_gpu(checkpoints):
    """On a real GPU (the lead's device run): the cuda backend in bfloat16 and float32 on an
    nf4 double-quant checkpoint gives the dequantized checkpoint's greedy tokens (float32), and
    bfloat16 stays within a token or two of them."""
    bnb_dir, deq_dir = checkpoints("llama-sharp", bits=4, quant_type="nf4", double_quant=True)
    want = generate(deq_dir, PROMPTS, MAX_NEW, device="cuda")
    assert generate(bnb_dir, PROMPTS, MAX_NEW, device="cuda") == want
    from tessellm import LLM, SamplingParams

    with LLM(bnb_dir, dtype="bfloat16", device="cuda", num_kv_blocks=64) as llm:
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    agree = sum(a == b for o, w in zip(outs, want) for a, b in zip(o.outputs[0].token_ids, w))
    assert agree >= 0.8 * len(PROMPTS) * MAX_NEW


def test_layers_left_in_float_stay_dense(checkpoints):
    """``llm_int8_skip_modules`` (down_proj here): those layers are stored float and served
    dense beside the 4-bit ones, the dequantized model's tokens."""
    from tests.conftest import hf_greedy

    bnb_dir, deq_dir = checkpoints("llama", bits=4, quant_type="nf4", skip_modules="down_proj")
    layers = quantized_linears(build(bnb_dir))
    assert [s.kind for s in layers["layers.1.mlp.down_proj"].segments] == ["dense"]
    assert [s.kind for s in layers["layers.1.mlp.gate_up_proj"].segments] == ["bnb4"]
    assert generate(bnb_dir, PROMPTS, MAX_NEW) == hf_greedy(deq_dir, PROMPTS, MAX_NEW)


def test_bnb4_layers_keep_the_stored_codes(checkpoints):
    """Each 4-bit layer holds the checkpoint's bytes (``N*K/2``), one float32 absmax a block of
    64 (double quant widened) and the table: no dense weight; q/k/v and gate/up stack into one
    segment."""
    from safetensors.torch import load_file

    bnb_dir, _ = checkpoints("llama", bits=4, quant_type="nf4", double_quant=True)
    stored = load_file(os.path.join(bnb_dir, "model.safetensors"))
    layers = quantized_linears(build(bnb_dir))
    qkv = layers["layers.0.self_attn.qkv_proj"]
    assert [type(s).__name__ for s in qkv.segments] == ["Bnb4Weight"]
    seg = qkv.segments[0]
    parts = ["q_proj", "k_proj", "v_proj"]
    want = torch.cat([stored[f"model.layers.0.self_attn.{p}.weight"].reshape(-1) for p in parts])
    assert torch.equal(seg.qweight.reshape(-1), want)
    for layer in layers.values():
        for s in layer.segments:
            assert s.kind == "bnb4" and s.absmax.numel() * 64 == s.qweight.numel() * 2
        assert all(p.numel() == 0 for name, p in layer.named_parameters(recurse=False)
                   if name != "bias")


def test_quantized_on_load_as_transformers_quantizes(checkpoints, tiny_model_dir):
    """``quantization="bitsandbytes"`` on the dense checkpoint: NF4 with double quantization,
    blocksize 64 (vLLM's and transformers' defaults), the very codes transformers saves, so
    the same tokens as the saved checkpoint."""
    bnb_dir, _ = checkpoints("llama", bits=4, quant_type="nf4", double_quant=True)
    dense_dir = os.path.join(os.path.dirname(bnb_dir), "llama-dense")
    saved = quantized_linears(build(bnb_dir))
    loaded = quantized_linears(build(dense_dir, quantization="bitsandbytes"))
    for name, layer in saved.items():
        for a, b in zip(layer.segments, loaded[name].segments):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.absmax, b.absmax), name
    assert generate(dense_dir, PROMPTS[:2], 4, quantization="bitsandbytes") == \
        generate(bnb_dir, PROMPTS[:2], 4)


# -- tensor parallelism --------------------------------------------------------------------


def test_bnb8_ranks_hold_their_part(checkpoints):
    """8-bit: each rank's int8 rows (column-parallel) or columns (row-parallel) with their row
    scales, bit for bit the one-device layer's."""
    from tests.distributed.test_parallel_prequantized import assert_ranks_hold_their_part

    bnb_dir, _ = checkpoints("llama", bits=8)
    assert_ranks_hold_their_part(bnb_dir, "cpu", 2)


@pytest.mark.parametrize("form", [FORMS[0], FORMS[3]], ids=["nf4-dq", "fp4"])
def test_bnb4_ranks_hold_their_part(checkpoints, form):
    """4-bit at T=2: column-parallel ranks hold their rows of codes and absmaxes, row-parallel
    ones whole blocks of each row's inputs; bit for bit the one-device layer's."""
    from tests.distributed.test_parallel_prequantized import assert_ranks_hold_their_part

    bnb_dir, _ = checkpoints("llama-wide", **form)
    assert_ranks_hold_their_part(bnb_dir, "cpu", 2)


def test_bnb4_tp2_generates_like_one_device(checkpoints):
    """Two cpu workers (gloo) serve the nf4 checkpoint with the one-device model's greedy
    tokens and prompt log-probabilities (to float32 reassociation: row-parallel layers sum
    the ranks' partial products)."""
    from tests.models.variant_parity import ours

    bnb_dir, _ = checkpoints("llama-wide", **FORMS[0])
    run = lambda **kw: ours(bnb_dir, PROMPTS[:2], 4, device="cpu", num_kv_blocks=64,  # noqa: E731
                            seed=0, **kw)
    one, two = run(), run(tensor_parallel_size=2)
    assert two[0] == one[0]
    for got, want in zip(two[1], one[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_bnb4_split_off_blocks_refused(checkpoints):
    """T=4: o_proj's 128 inputs give each rank 32, half a block of 64: refused naming the
    layer and the fix."""
    from tessellm.distributed.parallel_state import TensorParallel

    bnb_dir, _ = checkpoints("llama-wide", **FORMS[0])
    with pytest.raises(ValueError, match=r"o_proj cannot be split over tensor_parallel_size=4: "
                                         r"each rank would take 32 of its 128 inputs"):
        build(bnb_dir, tp=TensorParallel(0, 4))


def test_quantized_on_load_under_tensor_parallelism(checkpoints):
    """Each rank quantizes its own slice (as vLLM does): rank r's layer is the NF4 of its rows
    or columns of the dense weight."""
    from safetensors.torch import load_file

    from tessellm.distributed.parallel_state import TensorParallel

    bnb_dir, _ = checkpoints("llama", bits=4, quant_type="nf4", double_quant=True)
    dense_dir = os.path.join(os.path.dirname(bnb_dir), "llama-dense")
    full = load_file(os.path.join(dense_dir, "model.safetensors"))[
        "model.layers.1.self_attn.o_proj.weight"]
    for rank in range(2):
        layers = quantized_linears(build(dense_dir, tp=TensorParallel(rank, 2),
                                         quantization="bitsandbytes"))
        o = layers["layers.1.self_attn.o_proj"]
        want = full[:, o.input_start:o.input_start + o.input_size]
        got = torch.cat([s.dequantize() for s in o.segments])
        assert got.shape == want.shape
        assert ((got - want).norm() / want.norm()) < 0.15


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("qc,match", [
    ({"load_in_4bit": True, "load_in_8bit": True}, "exactly one must be true"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "nf4 or fp4"),
    ({"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}, "only uint8"),
    ({"load_in_8bit": True, "llm_int8_has_fp16_weight": True}, "as a dense model"),
])
def test_bad_configs_refused(qc, match):
    from tessellm.quantization.config import parse_checkpoint_config

    with pytest.raises(ValueError, match=match):
        parse_checkpoint_config({"quant_method": "bitsandbytes", **qc})


@pytest.mark.parametrize("text", [
    '[1, 2]', '"nf4"', '{"quant_type": "nf4", "blocksize": null, "shape": [4, 64]}',
    '{"quant_type": "nf4", "blocksize": 64.5, "shape": [4, 64]}',
    '{"quant_type": "nf4", "blocksize": 1e400, "shape": [4, 64]}',
    '{"quant_type": "nf4", "blocksize": 64, "shape": 5}', '{"quant_type": "nf4", "blocksize": 64, "shape": "ab"}',
    '{"quant_type": "nf4", "blocksize": 64, "shape": ["4", "64"]}',
    '{"quant_type": "nf4", "blocksize": 64, "shape": [-4, 64]}',
    '{"quant_type": "nf4", "blocksize": 64, "shape": [4, 64], "nested_blocksize": 0}',
    '{"quant_type": "nf4", "blocksize": 64, "shape": [4, 64], "nested_offset": "x"}',
])
def test_malformed_quant_state_refused(text):
    """A quant_state that is not bitsandbytes' JSON object of integers: one ValueError naming
    the layer (not an AttributeError / TypeError from reading it, nor a later division by 0)."""
    raw = torch.tensor(list(text.encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"^layers\.0\.q_proj\.weight\.quant_state "):
        quant_state(raw, "layers.0.q_proj")


def _stored_4bit(absmax=None, quant_map=None, blocksize=64):
    """One 4-bit weight [4, 64] as a checkpoint stores it, its pieces replaced where given."""
    w = quantize_bnb4(torch.randn(4, 64))
    state = {"quant_type": "nf4", "blocksize": blocksize, "shape": [4, 64]}
    return [("l.weight", w.qweight.reshape(-1, 1)), ("l.weight.absmax", w.absmax if absmax is None else absmax),
            ("l.weight.quant_map", w.code if quant_map is None else quant_map),
            ("l.weight.quant_state.bitsandbytes__nf4", torch.tensor(list(json.dumps(state).encode()),
                                                                    dtype=torch.uint8))]


@pytest.mark.parametrize("pieces", [dict(absmax=torch.ones(3)), dict(quant_map=torch.ones(15)),
                                    dict(blocksize=128)], ids=["absmax", "quant_map", "blocksize"])
def test_state_not_matching_the_codes_refused(pieces):
    """absmaxes or a code table that do not fit the quant_state's shape and blocksize: one
    ValueError naming the weight (was a bare AssertionError)."""
    from tessellm.quantization.bnb_stored import stored_weights

    assert [name for name, _ in stored_weights(_stored_4bit())] == ["l.weight"]
    with pytest.raises(ValueError, match=r"^l\.weight has \d+ absmax values and a quant_map of \d+ entries"):
        list(stored_weights(_stored_4bit(**pieces)))


@pytest.mark.parametrize("fmt", [torch.zeros(0, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8)],
                         ids=["empty", "two"])
def test_bnb8_weight_format_not_one_value_refused(fmt):
    """An 8-bit weight's ``weight_format`` holds the layout's one number; an empty (or longer)
    one is a ValueError naming the tensor and the fix (was an IndexError)."""
    from tessellm.quantization.bnb_stored import stored_weights

    pieces = [("l.weight", torch.ones(4, 8, dtype=torch.int8)), ("l.SCB", torch.ones(4))]
    row_major = ("l.weight_format", torch.zeros(1, dtype=torch.uint8))
    assert [n for n, _ in stored_weights(pieces + [row_major])] == ["l.weight"]
    with pytest.raises(ValueError, match=r"^l\.weight_format holds \d+ values where bitsandbytes "
                                         "writes one .* Save the model again"):
        list(stored_weights(pieces + [("l.weight_format", fmt)]))


@pytest.mark.parametrize("nested_absmax,nested_code", [(2, 256), (3, 100)])
def test_nested_state_not_matching_the_absmaxes_refused(nested_absmax, nested_code):
    """Double quantization: 600 8-bit absmaxes in blocks of 256 need 3 nested absmaxes and a
    256-entry table; fewer is one ValueError naming the weight (was an IndexError)."""
    state = {"nested_blocksize": 256, "nested_offset": 0.0}
    absmax = torch.randint(0, 256, (600,), dtype=torch.uint8)
    assert widen_absmax({"absmax": absmax, "nested_absmax": torch.ones(3), "nested_quant_map": torch.ones(256)},
                        state, "l").shape == (600,)
    with pytest.raises(ValueError, match=r"^l\.weight has \d+ nested_absmax values"):
        widen_absmax({"absmax": absmax, "nested_absmax": torch.ones(nested_absmax),
                      "nested_quant_map": torch.ones(nested_code)}, state, "l")


def test_checkpoint_not_matching_the_config_refused(checkpoints, tmp_path):
    """A quant_state whose shape is not the layer's: one sentence naming the layer."""
    from safetensors.torch import load_file, save_file

    bnb_dir, _ = checkpoints("llama", bits=4, quant_type="fp4", double_quant=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(bnb_dir):
        if f.endswith(".json"):
            (broken / f).write_text(open(os.path.join(bnb_dir, f)).read())
    state = load_file(os.path.join(bnb_dir, "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__fp4"
    meta = json.loads(bytes(state[key].tolist()))
    meta["shape"] = meta["shape"][::-1]
    state[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj\.weight is a bitsandbytes "
                                         r"weight of \[128, 64\], but the layer takes \[64, 128\]"):
        build(str(broken))


def test_quantize_on_load_without_the_package_says_how(tiny_model_dir, monkeypatch):
    from tessellm.config import resolve_model
    from tessellm.quantization.config import resolve_quant_spec

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        resolve_quant_spec("bitsandbytes", resolve_model(tiny_model_dir("llama")))


def test_quantize_on_load_where_bitsandbytes_has_no_kernels_runs_on_the_cpu():
    """NF4 on load runs on the layer's device (``quantize_on_load(w, device)``); a device the
    package has no kernels for (here the meta device) quantizes on the CPU: the same codes."""
    pytest.importorskip("bitsandbytes")
    from tessellm.quantization.bnb_method import quantize_on_load

    w = torch.randn(64, 128)
    here, fallback = quantize_on_load(w), quantize_on_load(w, torch.device("meta"))
    assert fallback.qweight.device.type == "cpu"
    assert torch.equal(here.qweight, fallback.qweight) and torch.equal(here.absmax, fallback.absmax)
