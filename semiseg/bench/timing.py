"""Timing helpers: side-by-side alternating medians, compile time, FLOP counts and a GEMM peak."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def time_once(fn: Callable[[], Any]) -> float:
  """Seconds of one call; ``fn`` must block until its work is done."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# Seconds each timed sample lasts at least (see alternating_medians); experiments.benchmark sets it.
MIN_SAMPLE_S = 0.2


def alternating_medians(fns: dict[str, Callable[[], Any] | None], repeats: int,
                        warmup: int = 1, min_sample_s: float | None = None) -> dict[str, float | None]:
  """Median seconds per call of each fn, sampled in turn (a, b, a, b, ...) after ``warmup`` calls each.

  Alternating puts the same machine load on every contender, which matters on a shared machine.
  Each sample runs a fn back to back as many times as it takes to last about ``min_sample_s``
  (from its last warm-up call; default ``MIN_SAMPLE_S``) and divides: a short call otherwise
  measures a cold start after the other contender ran (thread pool woken, caches refilled: an
  augmentation call takes 9.9 ms right after the scipy loop and 3.9 ms back to back on this CPU),
  not the steady state a training loop runs in. A ``None`` entry (a reference that is not
  available) gives ``None``.
  """
  min_sample_s = MIN_SAMPLE_S if min_sample_s is None else min_sample_s
  live = {k: f for k, f in fns.items() if f is not None}
  calls = {}
  for k, f in live.items():
    last = 0.0
    for _ in range(max(1, warmup)):
      last = time_once(f)
    calls[k] = max(1, min(1000, math.ceil(min_sample_s / max(last, 1e-6))))
  times: dict[str, list[float]] = {k: [] for k in live}

  def sample(f, n):
    for _ in range(n):
      f()
  for _ in range(max(1, repeats)):
    for k, f in live.items():
      times[k].append(time_once(lambda f=f, n=calls[k]: sample(f, n)) / calls[k])
  return {k: (statistics.median(times[k]) if k in times else None) for k in fns}


def compile_step(fn: Callable, *args) -> tuple[Any, float, float | None]:
  """(compiled, seconds to lower + compile, FLOPs per call from XLA's cost analysis or None)."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=0).lower(*args).compile()
  seconds = time.perf_counter() - start
  return compiled, seconds, flops_of(compiled)


def flops_of(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def gemm_peak_gflops(n: int = 2048, repeats: int = 5, torch_module=None, torch_device: str = 'cpu') -> float:
  """Measured fp32 GEMM GFLOP/s (n x n x n), the best of jax's and (when given) torch's matmul."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.dot)
  fns: dict[str, Callable[[], Any] | None] = {'jax': lambda: mm(a, b).block_until_ready(), 'torch': None}
  if torch_module is not None:
    ta = torch_module.randn(n, n, device=torch_device)
    tb = torch_module.randn(n, n, device=torch_device)

    def torch_mm():
      torch_module.mm(ta, tb)
      if torch_device.startswith('cuda'):
        torch_module.cuda.synchronize()
    fns['torch'] = torch_mm
  best = min(t for t in alternating_medians(fns, repeats).values() if t is not None)
  return 2 * n ** 3 / best / 1e9
