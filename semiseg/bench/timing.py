"""Timing helpers: side-by-side alternating medians, compile time, XLA's FLOP count, GEMM peaks per
precision and time limits for benchmark stages."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import statistics
import threading
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
  available) gives ``None``. Inside a ``time_limit``, fewer rounds (at least one) when the next would
  not end in time.
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
    round_start = time.monotonic()
    for k, f in live.items():
      times[k].append(time_once(lambda f=f, n=calls[k]: sample(f, n)) / calls[k])
    if seconds_left() < 1.5 * (time.monotonic() - round_start):  # another round would pass a time_limit
      break
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


# The GEMM precisions measured per platform: on a GPU, fp32 on CUDA cores (matmul precision 'highest'),
# TF32 on tensor cores (JAX's default for float32 there) and bf16; a CPU has no TF32.
PEAK_PRECISIONS = {'cpu': ('fp32', 'bf16'), 'gpu': ('fp32', 'tf32', 'bf16')}


@dataclasses.dataclass(frozen=True)
class Peak:
  """Measured n x n x n GEMM GFLOP/s in one precision, of jax and (when given) torch."""
  precision: str
  n: int
  jax_gflop_per_s: float | None
  torch_gflop_per_s: float | None
  note: str = ''

  @property
  def best(self) -> float | None:
    return max((g for g in (self.jax_gflop_per_s, self.torch_gflop_per_s) if g), default=None)


def gemm_peak(precision: str, n: int, repeats: int = 5, torch_module=None, torch_device: str = 'cpu') -> Peak:
  """GEMM GFLOP/s in ``precision`` (fp32, tf32 or bf16), jax's and torch's side by side.

  fp32 is true float32 (``jax.default_matmul_precision('highest')``, torch's matmul precision
  'highest'), tf32 float32 operands on TF32 tensor cores ('tensorfloat32' / 'high'), bf16 bfloat16
  operands with float32 accumulation. A library that cannot run it gives None and a note.
  """
  dtype = jnp.bfloat16 if precision == 'bf16' else jnp.float32
  jax_precision = {'fp32': 'highest', 'tf32': 'tensorfloat32', 'bf16': 'default'}[precision]
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  fns: dict[str, Callable[[], Any] | None] = {'jax': None, 'torch': None}
  notes = []
  try:
    with jax.default_matmul_precision(jax_precision):  # read when tracing, so compile inside
      mm = jax.jit(jnp.dot).lower(a, b).compile()
    fns['jax'] = lambda: mm(a, b).block_until_ready()
  except Exception as e:  # noqa: BLE001 - a backend without this precision
    notes.append(f'jax: {type(e).__name__}: {str(e).splitlines()[0][:200]}')
  if torch_module is not None:
    t = torch_module
    default_mode = t.get_float32_matmul_precision()
    tdtype = t.bfloat16 if precision == 'bf16' else t.float32
    ta, tb = (t.randn(n, n, device=torch_device, dtype=tdtype) for _ in range(2))
    mode = {'fp32': 'highest', 'tf32': 'high', 'bf16': 'highest'}[precision]

    def torch_mm():
      t.set_float32_matmul_precision(mode)  # a global setting: set on every call, in turn with jax's
      t.mm(ta, tb)
      if torch_device.startswith('cuda'):
        t.cuda.synchronize()
    fns['torch'] = torch_mm
  try:
    seconds = alternating_medians(fns, repeats)
  finally:
    if torch_module is not None:
      torch_module.set_float32_matmul_precision(default_mode)
  gflops = {k: 2 * n ** 3 / s / 1e9 if s else None for k, s in seconds.items()}
  return Peak(precision, n, gflops['jax'], gflops['torch'], '; '.join(notes))


class StageTimeout(BaseException):
  """A ``time_limit`` ran out. A BaseException, so that no ``except Exception`` in a workload takes it."""

  def __init__(self, what: str, seconds: float):
    super().__init__(f'{what}: stopped after its {seconds:.0f} s limit')
    self.what, self.seconds = what, seconds


_DEADLINE: list[float] = []  # monotonic deadlines of the enclosing time_limit blocks, innermost last


def seconds_left() -> float:
  """Seconds until the innermost ``time_limit`` ends (inf outside one)."""
  return min(_DEADLINE, default=math.inf) - time.monotonic()


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str):
  """Raises ``StageTimeout`` in the block after ``seconds`` (None, <= 0 or inf: no limit); nests.

  SIGALRM-based: it stops the block at its next Python instruction (a long XLA compile finishes
  first), and only in the main thread (elsewhere the block runs unlimited). ``alternating_medians``
  also stops sampling early to end inside the limit.
  """
  if not seconds or not 0 < seconds < math.inf or threading.current_thread() is not threading.main_thread():
    yield
    return
  deadline = min(time.monotonic() + seconds, min(_DEADLINE, default=math.inf))

  def alarm(signum, frame):
    raise StageTimeout(what, seconds)
  previous = signal.signal(signal.SIGALRM, alarm)
  _DEADLINE.append(deadline)
  signal.setitimer(signal.ITIMER_REAL, max(1e-3, deadline - time.monotonic()))
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    _DEADLINE.pop()
    signal.signal(signal.SIGALRM, previous)
    if _DEADLINE:  # re-arm the enclosing limit
      signal.setitimer(signal.ITIMER_REAL, max(1e-3, _DEADLINE[-1] - time.monotonic()))
