"""Bucketed step shapes (tessellm/core/shape_buckets.py): the padding a compiling device (the tpu
backend on XLA) gets and the shape classes it precompiles (the whole engine on them:
tests/backends/test_emulate.py, emulated tpu; tests/lanes/test_tpu_lane.py, real torch-xla)."""

from __future__ import annotations

import numpy as np

from tessellm.core.block_table import PersistentBlockTable
from tessellm.core.input_batch import RunnerRequest
from tessellm.core.input_builder import build_inputs
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.shape_buckets import Buckets, pad_host_inputs, pow2, step_shapes

BUCKETS = Buckets(token=lambda n: pow2(n, 8), seq=pow2)


def _host(counts, computed, block_size=4, width=8):
    tables = PersistentBlockTable(width, rows=len(counts))
    states = []
    for i, (n, c) in enumerate(zip(counts, computed)):
        blocks = [10 * i + b for b in range(-(-(n + c) // block_size))]
        states.append(RunnerRequest(f"r{i}", list(range(100, 100 + n + c)), n + c,
                                    SamplingParams(max_tokens=1), blocks, c, tables.add(blocks)))
    return build_inputs(states, counts, None, tables, block_size, None)


def test_pad_host_inputs_pads_tokens_rows_and_table():
    host = _host([1, 3, 1], [5, 0, 2])  # 5 tokens, 3 sequences, widest table 2 blocks
    padded = pad_host_inputs(host, BUCKETS, 3, table_width=8)
    assert padded.num_tokens == 8 and host.num_tokens == 5
    assert padded.input_ids[:5].tolist() == host.input_ids.tolist()
    assert padded.input_ids[5:].tolist() == [0, 0, 0]
    assert padded.slot_mapping[5:].tolist() == [-1, -1, -1]  # padding writes nothing
    assert padded.slot_mapping[:5].tolist() == host.slot_mapping.tolist()
    # rows: 3 real (last token of each sequence), padded to 4 with the last row repeated
    assert host.logits_indices.tolist() == [0, 3, 4]
    assert padded.logits_indices.tolist() == [0, 3, 4, 4]
    assert padded.block_table.shape == (3, 8)
    assert np.array_equal(padded.block_table[:, :host.block_table.shape[1]], host.block_table)
    assert not padded.block_table[:, host.block_table.shape[1]:].any()


def test_step_shapes_cover_every_bucket_once():
    shapes = step_shapes(BUCKETS, max_num_seqs=4, max_num_tokens=32, max_model_len=128)
    keys = {(BUCKETS.token(sum(c)), BUCKETS.seq(len(c)), all(n == 1 for n in c)) for c in shapes}
    assert len(keys) == len(shapes) == 12
    assert {k for k in keys if k[2]} == {(8, 1, True), (8, 2, True), (8, 4, True)}
    assert {(t, s) for t, s, d in keys if not d} == {(t, s) for t in (8, 16, 32) for s in (1, 2, 4)}
    # a step the scheduler can make falls in one of them
    for counts in ([1, 1, 1], [7], [3, 9, 1], [1, 1, 1, 29]):
        decode = all(n == 1 for n in counts)
        assert (BUCKETS.token(sum(counts)), BUCKETS.seq(len(counts)), decode) in keys
    # no sequence longer than the model's context
    assert all(max(c) <= 16 for c in step_shapes(BUCKETS, 4, 64, max_model_len=16))
