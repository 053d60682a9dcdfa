"""Input-path throughput: how many images/s the batch stream (plus the host-to-device copy) delivers."""

from __future__ import annotations

import time

import jax

from semiseg.data import pipeline


def measure_input(split: pipeline.Split, batch_size: int = 16, steps: int = 50,
                  to_device: bool = True, prefetch: int = 2) -> float:
  """Images/s over ``steps`` batches after one warm-up batch; each put on device when ``to_device``."""
  stream = pipeline.batch_stream(split, batch_size=batch_size, seed=0, prefetch=prefetch)
  try:
    batch = next(stream)
    if to_device:
      jax.block_until_ready(jax.device_put(batch))
    start = time.perf_counter()
    for _ in range(steps):
      batch = next(stream)
      if to_device:
        # The trainer uses jax.make_array_from_process_local_data; on one host this is the same copy.
        jax.block_until_ready(jax.device_put(batch))
    return steps * batch_size / (time.perf_counter() - start)
  finally:
    stream.close()
