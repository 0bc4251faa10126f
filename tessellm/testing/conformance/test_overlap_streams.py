"""``Backend.overlap_streams`` (plugin API 10, optional) and its optional ``gemm_sm_carveout``
(API 25): the decode micro-batch overlap's second stream (``core/decode_overlap.py``,
``models/micro_batches.py``). The reference is ``backends/reference/streams.SequentialStreams``
(one stream, no carve-out), what a backend without them gets.

* Work queued inside ``side(ready)`` sees what the current stream queued before ``record()``
  made ``ready``; the current stream, after ``wait(done)``, sees what the side stream wrote
  before ``record()`` made ``done`` (each checked behind long device work on the other stream).
* ``gemm_sm_carveout(sms)``: a value the device cannot take is one ``ValueError`` when asked
  for; a GEMM queued inside the scope equals the same GEMM outside it, and after it."""

from __future__ import annotations

import pytest
import torch


def _streams(target):
    target.skip_if_emulated("device streams")
    make = getattr(target.backend, "overlap_streams", None)
    if make is None:
        pytest.skip(f"{target.name} has no Backend.overlap_streams (split steps run on one "
                    "stream: SequentialStreams)")
    return make()


def _busy(device) -> None:
    """Some milliseconds of work queued on the current stream."""
    x = torch.full((1024, 1024), 1e-3, device=device)
    for _ in range(20):
        x = x @ x


def test_overlap_streams_order_the_work(target):
    streams, dev = _streams(target), target.device
    n = 1 << 20
    for _ in range(3):
        a = torch.zeros(n, device=dev)
        _busy(dev)
        a.fill_(1.0)  # behind the busy work: the side stream must wait for it
        ready = streams.record()
        with streams.side(ready):
            b = a * 2  # made on the side stream, kept referenced until waited for
            _busy(dev)
            b.add_(1.0)  # behind the side stream's busy work: the main stream must wait
            done = streams.record()
        streams.wait(done)
        got = b.clone()  # on the current stream, after the wait
        assert torch.equal(got.cpu(), torch.full((n,), 3.0)), "a stream ran ahead of its event"
        del a, b


def test_gemm_sm_carveout_scope(target):
    streams, dev = _streams(target), target.device
    carve = getattr(streams, "gemm_sm_carveout", None)
    if carve is None:
        pytest.skip(f"{target.name}'s OverlapStreams has no gemm_sm_carveout (API 25, optional)")
    for bad in (-1, 1 << 20):
        with pytest.raises(ValueError):
            carve(bad)
    g = torch.Generator().manual_seed(0)
    dtype = target.low_precision_dtype
    a = torch.randn(256, 512, generator=g).to(dev, dtype)
    w = torch.randn(384, 512, generator=g).to(dev, dtype)
    want = torch.nn.functional.linear(a, w).float().cpu()
    scope = carve(8)  # asking does no work until the scope is entered
    with scope:
        inside = torch.nn.functional.linear(a, w).float().cpu()
    after = torch.nn.functional.linear(a, w).float().cpu()
    torch.testing.assert_close(inside, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(after, want, rtol=2e-2, atol=2e-2)
