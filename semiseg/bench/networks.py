"""The networks' workloads: train steps and AE + U-Net inference of semiseg beside the PyTorch
reference (``semiseg.bench.torch_reference``), in each precision (fp32, bf16) beside each PyTorch
variant of that precision (``suite.VARIANTS``: plain, channels_last, bf16 autocast, torch.compile),
with GFLOP/s from the analytic count of the network (``semiseg.bench.flops``) against the measured
GEMM peak of the precision the math runs in (``bench_peaks``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from semiseg import sharding
from semiseg.bench import flops, suite, timing
from semiseg.bench.suite import DTYPES, VARIANTS, Record, Setting, Torch, Variant, device_name
from semiseg.methods import ae_unet, autoencoder, base, unet

TRAIN_METHODS = ('ae', 'unet', 'ae_unet')


def _context(config) -> base.MethodContext:
  return base.MethodContext(image_size=config.data.image_size, texture=False, steps_per_epoch=100)


def _batch(config, seed: int = 0) -> base.Batch:
  rng = np.random.default_rng(seed)
  s, b = config.data.image_size, config.batch_size
  stream = {'image': rng.integers(0, 256, (b, s, s, 3), np.uint8),
            'mask': (rng.random((b, s, s, 1)) > 0.9).astype(np.uint8)}
  return jax.device_put({'labeled': stream, 'unlabeled': dict(stream)})


def with_precision(config, precision: str):
  """A copy of ``config`` computing in ``precision`` (fp32 or bf16)."""
  config = copy.deepcopy(config)
  config.model.dtype = DTYPES[precision]
  return config


def create_method(config, name: str) -> tuple[base.Method, base.TrainState]:
  """One of TRAIN_METHODS with a fresh state; ae_unet's frozen AE is an initialised (untrained) AE."""
  ctx = _context(config)
  key = jax.random.PRNGKey(config.seed)
  if name == 'ae_unet':
    ae_init = autoencoder.create(config, ctx).init
    ae_params = sharding.compile_run_once(ae_init, key)(key).params
    method = ae_unet.create_with_ae(config, ctx, ae_params)
    return method, sharding.compile_run_once(method.init, key)(key).replace(extras=method.extras)
  method = {'ae': autoencoder, 'unet': unet}[name].create(config, ctx)
  return method, sharding.compile_run_once(method.init, key)(key)


def abstract_method(config, name: str) -> tuple[base.Method, base.TrainState]:
  """As ``create_method``, with the state as shapes only (nothing initialised): enough to count FLOPs
  and to lower and compile the steps."""
  ctx = _context(config)
  key = jax.random.PRNGKey(config.seed)
  if name == 'ae_unet':
    ae_params = jax.eval_shape(autoencoder.create(config, ctx).init, key).params
    method = ae_unet.create_with_ae(config, ctx, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), ae_params))
    return method, jax.eval_shape(method.init, key).replace(extras={'ae_params': ae_params})
  method = {'ae': autoencoder, 'unet': unet}[name].create(config, ctx)
  return method, jax.eval_shape(method.init, key)


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def workload_flops(method: base.Method, state: base.TrainState, batch_size: int, image_size: int) -> flops.Flops:
  """The analytic count of ``method``'s network on a batch: ``.train()`` per step, ``.forward()`` per
  inference."""
  images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
  return flops.method_flops(method, _abstract(state), images)


def _torch_steps(config, torch: Torch, variant: Variant):
  from semiseg.bench import torch_reference
  m = config.model
  return torch_reference.TrainSteps(image_size=config.data.image_size, batch_size=config.batch_size,
                                    unet_features=m.unet_features, unet_depth=m.unet_depth, unet_norm=m.unet_norm,
                                    ae_bottleneck=m.ae_bottleneck, ae_normalize=m.ae_normalize,
                                    ae_features=tuple(m.ae_features), latent_dim=m.latent_dim,
                                    device=torch.device, channels_last=variant.channels_last,
                                    bf16=variant.bf16, compile=variant.compile,
                                    cudnn_benchmark=variant != VARIANTS['fp32'])


@dataclasses.dataclass
class _Contender:
  fn: Callable[[], Any] | None
  first_s: float | None = None  # the first call: allocation, thread pools; torch.compile compiles in it
  why: str = ''  # why fn is None


def _prepare(make: Callable[[], Callable[[], Any]], what: str, limit_s: float | None) -> _Contender:
  """Builds a contender and calls it once (compilation, first call) within ``limit_s`` and within 60 %
  of what is left of an enclosing ``timing.time_limit`` (the rest is for timing the others). A
  failure or timeout is kept as ``why`` (e.g. torch.compile without a working compiler), and the
  benchmark goes on without it."""
  left = timing.seconds_left()
  if left < math.inf:
    limit_s = min(limit_s or math.inf, 0.6 * left)
  try:
    with timing.time_limit(limit_s, what):
      fn = make()
      first_s = timing.time_once(fn)
  except timing.StageTimeout as e:
    if e.what != what:
      raise
    return _Contender(None, why=str(e))
  except Exception as e:  # noqa: BLE001 - the reason goes into the JSON note
    logging.warning('%s failed', what, exc_info=True)
    return _Contender(None, why=f'{what} failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}')
  return _Contender(fn, first_s=first_s)


def _torch_contenders(torch: Torch, variants: tuple[str, ...], precisions: tuple[str, ...],
                      make: Callable[[Variant], Callable[[], Any]], what: str,
                      limit_s: float | None) -> dict[str, _Contender]:
  """PyTorch variants of the asked precisions, each prepared (built, compiled, run once)."""
  if not torch.module:
    return {}
  return {v: _prepare(lambda v=v: torch.timed(make(VARIANTS[v])), f'{what} PyTorch {VARIANTS[v].label}', limit_s)
          for v in variants if VARIANTS[v].precision in precisions}


def _rows(common: dict[str, Any], precisions: tuple[str, ...], ours: dict[str, _Contender],
          theirs: dict[str, _Contender], seconds: dict[str, float | None], per_call: int, torch: Torch,
          flops_per_call: float | None, peaks: dict[str, float | None],
          note: Callable[[float | None, float | None], str]) -> list[Record]:
  """One row per (precision, PyTorch variant of that precision): semiseg in that precision beside it."""
  records = []
  for p in precisions:
    t = seconds.get(f'semiseg {p}')
    for v in [v for v in theirs if VARIANTS[v].precision == p] or [None]:
      ref_t = seconds.get(f'torch {v}') if v else None
      notes = (note(t, ref_t), f'first call {ours[p].first_s:.2f} s' if t else ours[p].why,
               (f'PyTorch first call {theirs[v].first_s:.1f} s' + (' (compiles)' if VARIANTS[v].compile else '')
                if ref_t else theirs[v].why) if v else '')
      record = Record(**common, semiseg_per_s=per_call / t if t else None,
                      reference_per_s=per_call / ref_t if ref_t else None, precision=p,
                      reference=f'{torch.name} {VARIANTS[v].label}' if v else torch.why,
                      note='; '.join(x for x in notes if x))
      records.append(suite.gflop_rates(record, flops_per_call, t, ref_t, peaks))
  return records


def bench_peaks(torch: Torch, n: int | None = None, repeats: int = 5) -> list[Record]:
  """GEMM GFLOP/s of each precision this device runs (timing.PEAK_PRECISIONS), jax beside torch; the
  peak of a precision (``peak_gflop_per_s``) is the better of the two. n: 2048 on a CPU, 8192 elsewhere."""
  platform = jax.devices()[0].platform
  n = n or (2048 if platform == 'cpu' else 8192)
  records = []
  for precision in timing.PEAK_PRECISIONS.get(platform, ('fp32', 'bf16')):
    peak = timing.gemm_peak(precision, n, repeats, torch_module=torch.module, torch_device=torch.device)
    records.append(Record(workload=f'gemm {precision}', semiseg_per_s=peak.jax_gflop_per_s,
                          reference_per_s=peak.torch_gflop_per_s, unit='GFLOP/s', device=device_name(),
                          shapes=f'{n}x{n}x{n}', reference=f'{torch.name} torch.mm' if torch.module else torch.why,
                          precision=precision, peak_gflop_per_s=peak.best, peak_precision=precision,
                          note='; '.join(x for x in ('semiseg column: jax.numpy.dot; peak = the better',
                                                     peak.note) if x)))
  return records


def bench_train(setting: Setting, torch: Torch, peaks: dict[str, float | None],
                methods: tuple[str, ...] = TRAIN_METHODS, precisions: tuple[str, ...] = ('fp32',),
                variants: tuple[str, ...] = ('fp32',), trace_dir: str | None = None,
                prepare_limit_s: float | None = None) -> list[Record]:
  """Steps/s of each method's jitted train step (augmentation included) vs the PyTorch step, per precision
  and PyTorch variant, all timed side by side; GFLOP/s from the analytic count of the network.

  ``trace_dir``: also records one semiseg step of each method with ``jax.profiler`` into
  ``<trace_dir>/<setting>_<method>[_bf16]`` (open in Perfetto or TensorBoard's profile plugin).
  ``prepare_limit_s``: a contender whose preparation (compilation + first call) takes longer is dropped.
  """
  config = setting.config
  batch = _batch(config)
  records = []
  for name in methods:
    ours, xla_flops, compile_s, analytic, holders = {}, {}, {}, None, []
    for p in precisions:
      holder = []
      holders.append(holder)

      def make(p=p, holder=holder):
        nonlocal analytic
        method, state = create_method(with_precision(config, p), name)
        analytic = analytic or workload_flops(method, state, config.batch_size, config.data.image_size).train()
        compiled, compile_s[p], xla_flops[p] = timing.compile_step(method.train_step, state, batch)
        holder.append(state)

        def run():
          holder[0], metrics = compiled(holder[0], batch)
          jax.block_until_ready((holder[0], metrics))
        return run
      ours[p] = _prepare(make, f'train {name} semiseg {p}', prepare_limit_s)
      if trace_dir and ours[p].fn:
        suffix = '' if p == 'fp32' else f'_{p}'
        with jax.profiler.trace(os.path.join(trace_dir, f'{setting.name}_{name}{suffix}'),
                                create_perfetto_trace=True):
          ours[p].fn()
    theirs = _torch_contenders(torch, variants, precisions,
                               lambda v: getattr(_torch_steps(config, torch, v), f'{name}_step'),
                               f'train {name}', prepare_limit_s)
    seconds = timing.alternating_medians({**{f'semiseg {p}': c.fn for p, c in ours.items()},
                                          **{f'torch {v}': c.fn for v, c in theirs.items()}}, setting.repeats)
    b = config.batch_size

    def note(t, ref_t):
      return (f'{b / t:.1f} images/s' if t else '') + (f' vs {b / ref_t:.1f}' if ref_t else '')
    rows = _rows(dict(workload=f'train {name}', unit='steps/s', device=device_name(), shapes=setting.shapes,
                      batch_size=b), precisions, ours, theirs, seconds, 1, torch, analytic, peaks, note)
    for r in rows:
      r.compile_s, r.xla_gflops_per_call = compile_s.get(r.precision), suite.giga(xla_flops.get(r.precision))
      r.note += '; semiseg includes augmentation'
    records += rows
    del holders[:], theirs
  return records


def bench_infer(setting: Setting, torch: Torch, peaks: dict[str, float | None], batch_sizes=(1, 16),
                precisions: tuple[str, ...] = ('fp32',), variants: tuple[str, ...] = ('fp32',),
                prepare_limit_s: float | None = None) -> list[Record]:
  """AE + U-Net score maps (frozen AE difference image + U-Net + sigmoid) per image, jitted vs PyTorch,
  per precision and PyTorch variant."""
  config = setting.config
  created = {p: create_method(with_precision(config, p), 'ae_unet') for p in precisions}
  s = config.data.image_size
  records = []
  for b in batch_sizes:
    images = jax.random.uniform(jax.random.PRNGKey(b), (b, s, s, 3), jnp.float32)
    ours, xla_flops, compile_s = {}, {}, {}
    for p, (method, state) in created.items():
      def make(method=method, state=state, p=p):
        start = time.perf_counter()
        compiled = jax.jit(method.score_map).lower(state, images).compile()
        compile_s[p], xla_flops[p] = time.perf_counter() - start, timing.flops_of(compiled)
        return lambda: compiled(state, images).block_until_ready()
      ours[p] = _prepare(make, f'infer b{b} semiseg {p}', prepare_limit_s)
    analytic = workload_flops(*created[precisions[0]], b, s).forward()

    def make_ref(v: Variant, b=b):
      ref = _torch_steps(config, torch, v)
      timages = ref.as_input(torch.module.rand(b, 3, s, s))
      return lambda: ref.ae_unet_predict(timages)
    theirs = _torch_contenders(torch, variants, precisions, make_ref, f'infer b{b}', prepare_limit_s)
    # A large batch takes long at the paper shapes on a CPU: fewer repeats there.
    seconds = timing.alternating_medians({**{f'semiseg {p}': c.fn for p, c in ours.items()},
                                          **{f'torch {v}': c.fn for v, c in theirs.items()}},
                                         setting.repeats if b == 1 else max(1, setting.repeats // 2))

    def note(t, ref_t, b=b):
      return (f'{1e3 * t / b:.1f} ms/image' if t else '') + (f' vs {1e3 * ref_t / b:.1f}' if ref_t else '')
    rows = _rows(dict(workload=f'infer ae_unet b{b}', unit='images/s', device=device_name(),
                      shapes=f'{s}px b{b} ' + setting.shapes.split(' ', 2)[2], batch_size=b),
                 precisions, ours, theirs, seconds, b, torch, analytic, peaks, note)
    for r in rows:
      r.compile_s, r.xla_gflops_per_call = compile_s.get(r.precision), suite.giga(xla_flops.get(r.precision))
    records += rows
  return records


