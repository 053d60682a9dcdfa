"""Input-path throughput on a fake clock: only the timed batches count, each goes to the device."""

import pytest

from semiseg.data import pipeline, throughput
from tests.data.test_pipeline import _split


def test_throughput_counts_the_timed_batches_only(monkeypatch):
  """On a clock that advances 0.25 s per batch drawn: 8 images per 0.25 s is 32 images/s, whatever the
  steps (the warm-up batch drawn and put on device, untimed); every batch goes to the device; the stream
  is closed."""
  clock, drawn, put, closed = [100.0], [], [], []
  real_stream = pipeline.batch_stream

  def stream(split, **kw):
    inner = real_stream(split, **kw)
    try:
      for batch in inner:
        clock[0] += 0.25
        drawn.append(batch)
        yield batch
    finally:
      inner.close()
      closed.append(True)
  monkeypatch.setattr(pipeline, 'batch_stream', stream)
  monkeypatch.setattr(throughput.time, 'perf_counter', lambda: clock[0])
  real_put = throughput.jax.device_put
  monkeypatch.setattr(throughput.jax, 'device_put', lambda x: put.append(x) or real_put(x))
  for steps in (3, 5):
    drawn.clear(), put.clear()
    assert throughput.measure_input(_split(40, 32), batch_size=8, steps=steps) == pytest.approx(32.0)
    assert len(drawn) == len(put) == steps + 1 and all(len(b['image']) == 8 for b in drawn)
  assert closed == [True, True]
  drawn.clear(), put.clear()
  throughput.measure_input(_split(40, 32), batch_size=8, steps=2, to_device=False)
  assert (len(drawn), put) == (3, [])
