"""The benchmark's records and shared parts: rows, settings, the PyTorch reference and its variants,
GFLOP/s against the peak of the precision in use, stages under time limits, the Markdown table; and
the small workloads: augmentation against a per-image scipy loop, the input path against what the
U-Net step consumes.

The networks' workloads (train steps, inference, GEMM peaks) are in ``semiseg.bench.networks``, the
U-Net's 3x3 convolutions one by one in ``semiseg.bench.layers``. Every workload gives ``Record``s,
timed side by side with its reference in the same process (alternating, after warm-up, median of
``repeats``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from semiseg import augment
from semiseg.bench import timing


@dataclasses.dataclass
class Record:
  """One row of the benchmark: throughput of semiseg and of its reference, ratio = semiseg / reference."""
  workload: str
  semiseg_per_s: float | None
  reference_per_s: float | None
  unit: str
  device: str
  shapes: str
  reference: str = ''  # what the semiseg column is compared with (for PyTorch: version, device, variant)
  precision: str = 'fp32'  # semiseg's config.model.dtype on this row; the reference runs the same
  batch_size: int | None = None  # images per call of train and infer rows
  compile_s: float | None = None
  gflops_per_call: float | None = None  # analytic (semiseg.bench.flops): the network's math, both sides
  xla_gflops_per_call: float | None = None  # XLA's cost analysis of the semiseg program, for comparison
  semiseg_gflop_per_s: float | None = None
  reference_gflop_per_s: float | None = None
  peak_gflop_per_s: float | None = None  # measured GEMM peak of peak_precision
  peak_precision: str = ''  # the GEMM precision the workload's math runs in here (fp32, tf32, bf16)
  note: str = ''

  @property
  def ratio(self) -> float | None:
    if not self.semiseg_per_s or not self.reference_per_s:
      return None
    return self.semiseg_per_s / self.reference_per_s

  def to_dict(self) -> dict[str, Any]:
    out = {**dataclasses.asdict(self), 'ratio': self.ratio}
    if self.batch_size and self.unit == 'steps/s':
      for side in ('semiseg', 'reference'):
        per_s = out[f'{side}_per_s']
        out[f'{side}_images_per_s'] = per_s * self.batch_size if per_s else None
    return out


@dataclasses.dataclass(frozen=True)
class Setting:
  """A named set of shapes (``cpu``: configs/synthetic.py's default; ``paper``: section 4.2) and its config."""
  name: str
  config: Any  # ml_collections ConfigDict (configs/synthetic.py)
  repeats: int

  @property
  def shapes(self) -> str:
    m, c = self.config.model, self.config
    return (f'{c.data.image_size}px b{c.batch_size} unet f{m.unet_features} d{m.unet_depth} '
            f'ae {tuple(m.ae_features)} z{m.latent_dim}')


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == 'cpu':
    return f'cpu ({os.cpu_count()} cores)'
  return f'{d.platform} {d.device_kind}'


# Row precision -> semiseg's config.model.dtype.
DTYPES = {'fp32': 'float32', 'bf16': 'bfloat16'}


def math_precision(precision: str) -> str:
  """The GEMM precision a row's convolutions run in on this device, whose peak the row is set against.

  bf16 rows: bf16. fp32 rows: TF32 on a GPU (JAX's default precision for float32 there, and PyTorch's
  for cuDNN convolutions) unless ``jax_default_matmul_precision`` asks for full float32; fp32 elsewhere.
  """
  if precision == 'bf16':
    return 'bf16'
  full = jax.config.jax_default_matmul_precision in ('highest', 'float32', 'F32_F32_F32')
  return 'tf32' if jax.devices()[0].platform == 'gpu' and not full else 'fp32'


@dataclasses.dataclass(frozen=True)
class Variant:
  """How the PyTorch reference runs (``torch_reference.TrainSteps``'s switches). Every variant but the
  plain ``fp32`` one also turns on ``cudnn.benchmark`` (on a GPU), as users who tune for speed do."""
  name: str
  channels_last: bool = False
  bf16: bool = False  # bf16 autocast: compared with semiseg's bf16 rows
  compile: bool = False

  @property
  def precision(self) -> str:
    return 'bf16' if self.bf16 else 'fp32'

  @property
  def label(self) -> str:
    return (f'{"bf16 autocast" if self.bf16 else "fp32"} {"channels_last" if self.channels_last else "NCHW"} '
            f'{"compiled" if self.compile else "eager"}')


# 'fp32' is the plain reference; the others are what users who care about speed run.
VARIANTS = {v.name: v for v in (
    Variant('fp32'),
    Variant('fp32_cl', channels_last=True),
    Variant('fp32_cl_compile', channels_last=True, compile=True),
    Variant('bf16_cl', channels_last=True, bf16=True),
    Variant('bf16_cl_compile', channels_last=True, bf16=True, compile=True),
)}


class Torch:
  """The optional PyTorch reference: the module and its device, or ``None`` when unavailable."""

  def __init__(self):
    self.module, self.device, self.why = None, 'cpu', ''
    try:
      import torch
    except ImportError:
      self.why = 'PyTorch not installed (pip install semiseg[bench])'
      return
    platform = jax.devices()[0].platform
    if platform != 'cpu' and not torch.cuda.is_available():
      self.why = f'no PyTorch CUDA for the {platform} comparison'
      return
    self.module, self.device = torch, ('cpu' if platform == 'cpu' else 'cuda')
    if self.device == 'cpu':
      torch.set_num_threads(os.cpu_count() or 1)

  @property
  def name(self) -> str:
    return f'PyTorch {self.module.__version__} {self.device}' if self.module else ''

  def timed(self, fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn, synchronised with the device when it returns; returns fn's result."""
    def call():
      out = fn()
      if self.device == 'cuda':
        self.module.cuda.synchronize()
      return out
    return call


def giga(x: float | None) -> float | None:
  return x / 1e9 if x else None


def gflop_rates(record: Record, flops_per_call: float | None, seconds: float | None,
                 ref_seconds: float | None, peaks: dict[str, float | None]) -> Record:
  """GFLOP/s from the analytic count, against the measured peak of the precision the math runs in."""
  record.peak_precision = math_precision(record.precision)
  record.peak_gflop_per_s = peaks.get(record.peak_precision)
  if flops_per_call:
    record.gflops_per_call = flops_per_call / 1e9
    record.semiseg_gflop_per_s = flops_per_call / seconds / 1e9 if seconds else None
    record.reference_gflop_per_s = flops_per_call / ref_seconds / 1e9 if ref_seconds else None
  return record


class Stages:
  """Runs named stages under time limits and writes every record so far to ``out`` (JSON) after each,
  so that a killed run keeps what it measured. A stage that fails, runs out of time or is not started
  before ``time_limit_s`` leaves a ``<name> (stage)`` row saying so, and the next stage runs."""

  def __init__(self, out: str | None, stage_limit_s: float | None, time_limit_s: float | None):
    self.out, self.stage_limit_s = out, stage_limit_s
    self.end = time.monotonic() + time_limit_s if time_limit_s else None
    self.records, self.failed = [], []

  def run(self, name: str, fn: Callable[[], list[Record]]) -> list[Record] | None:
    """``fn()``'s records, or None when it failed, ran out of time or was not started in time."""
    limit = self.stage_limit_s
    if self.end is not None:
      left = self.end - time.monotonic()
      limit = min(limit, left) if limit else left
    if limit is not None and limit <= 0:
      return self._fail(name, 'not started: the time limit of the run is spent')
    logging.info('stage %s%s', name, f' (limit {limit:.0f} s)' if limit else '')
    try:
      with timing.time_limit(limit, name):
        records = fn()
    except timing.StageTimeout as e:
      return self._fail(name, str(e))
    except Exception as e:  # noqa: BLE001 - one failed stage must not lose the others' measurements
      logging.exception('stage %s failed', name)
      return self._fail(name, f'failed: {type(e).__name__}: {e}')
    self.records += records
    self.write()
    return records

  def _fail(self, name: str, why: str) -> None:
    logging.warning('stage %s: %s', name, why)
    self.failed.append(name)
    self.records.append(Record(workload=f'{name} (stage)', semiseg_per_s=None, reference_per_s=None,
                               unit='', device=device_name(), shapes='', precision='', note=why))
    self.write()
    return None

  def write(self) -> None:
    if self.out:
      with open(self.out + '.tmp', 'w') as f:
        json.dump([r.to_dict() for r in self.records], f, indent=1)
      os.replace(self.out + '.tmp', self.out)


def scipy_warp_loop(images_BxHxWxC: np.ndarray, matrices_Bx3x3: np.ndarray) -> np.ndarray:
  """The reference: one ``scipy.ndimage.affine_transform`` (order 1) per image and channel."""
  from scipy import ndimage
  out = np.empty_like(images_BxHxWxC)
  for i, (image, m) in enumerate(zip(images_BxHxWxC, matrices_Bx3x3)):
    for c in range(image.shape[-1]):
      out[i, ..., c] = ndimage.affine_transform(image[..., c], m, order=1, mode='grid-constant', cval=0.0)
  return out


def bench_augment(batch_size: int = 16, image_size: int = 256, repeats: int = 5) -> list[Record]:
  """Images/s of augment.augment_batch (bilinear, zero border) vs the scipy loop on the same matrices."""
  spec = augment.AugmentSpec()
  key = jax.random.PRNGKey(0)
  images = jax.random.uniform(key, (batch_size, image_size, image_size, 3), jnp.float32)
  fn = jax.jit(lambda k, x: augment.augment_batch(k, x, None, spec))
  out, _, matrices = fn(key, images)
  host_images, host_matrices = np.asarray(images), np.asarray(matrices)
  ref_out = scipy_warp_loop(host_images, host_matrices)
  err = float(np.abs(np.asarray(out) - ref_out).max())
  t = timing.alternating_medians({'semiseg': lambda: jax.block_until_ready(fn(key, images)),
                                  'reference': lambda: scipy_warp_loop(host_images, host_matrices)}, repeats)
  return [Record(workload='augment', semiseg_per_s=batch_size / t['semiseg'],
                 reference_per_s=batch_size / t['reference'], unit='images/s', device=device_name(),
                 shapes=f'{image_size}px b{batch_size} x3 float32',
                 reference='scipy.ndimage.affine_transform order 1, per image and channel',
                 note=f'max |semiseg - scipy| = {err:.1e}; semiseg includes drawing the matrices')]


def bench_input(setting: Setting, unet_steps_per_s: float | None, steps: int = 30) -> list[Record]:
  """Images/s of the input path (semiseg.data.throughput.measure_input) vs what the U-Net step consumes."""
  config = setting.config
  b, s = config.batch_size, config.data.image_size
  consumed = unet_steps_per_s * b if unet_steps_per_s else None
  record = Record(workload='input', semiseg_per_s=None, reference_per_s=consumed, unit='images/s',
                  device=device_name(), shapes=f'{s}px b{b} uint8, in memory -> device',
                  reference='images/s consumed by the train unet step at these shapes')
  try:
    from semiseg.data import pipeline, throughput
  except ImportError as e:
    record.note = f'not available: {e}'
    return [record]
  rng = np.random.default_rng(0)
  n = max(4 * b, 32)
  split = pipeline.Split(images=rng.integers(0, 256, (n, s, s, 3), np.uint8),
                         masks=(rng.random((n, s, s, 1)) > 0.9).astype(np.uint8),
                         defect_types=['good'] * n, filenames=[f'{i}.png' for i in range(n)])
  record.semiseg_per_s = throughput.measure_input(split, batch_size=b, steps=steps)
  return [record]


def _fmt(x: float | None, digits: int = 3) -> str:
  if x is None:
    return 'n/a'
  if x == 0:
    return '0'
  return f'{x:.{max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))}f}'


def markdown(records: list[Record]) -> str:
  """The records as a Markdown table."""
  lines = ['| workload | precision | shapes | semiseg | reference | ratio | unit | against '
           '| GFLOP/s semiseg / ref (peak) | compile s | note |',
           '| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | ---: | --- |']
  for r in records:
    gf = ''
    if r.semiseg_gflop_per_s or r.reference_gflop_per_s:
      gf = (f'{_fmt(r.semiseg_gflop_per_s)} / {_fmt(r.reference_gflop_per_s)} '
            f'({r.peak_precision} {_fmt(r.peak_gflop_per_s)})')
    ratio = f'{r.ratio:.2f}x' if r.ratio else 'n/a'
    note = r.note.replace('|', '\\|')  # a pipe in a note would end its cell
    lines.append(f'| {r.workload} | {r.precision} | {r.shapes} | {_fmt(r.semiseg_per_s)} '
                 f'| {_fmt(r.reference_per_s)} | {ratio} | {r.unit} | {r.reference} | {gf} | {_fmt(r.compile_s)} '
                 f'| {note} |')
  return '\n'.join(lines)

