"""The benchmark workloads: semiseg's train steps, inference, augmentation and input path vs references.

Every workload gives a ``Record``; the networks are compared with the PyTorch implementation of the
same architectures in ``semiseg.bench.torch_reference`` (timed in the same process, alternating,
after warm-up, median of ``repeats``), augmentation with a per-image scipy loop doing the same warps,
and the input path with the images/s the U-Net train step consumes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from semiseg import augment
from semiseg.bench import timing
from semiseg.methods import ae_unet, autoencoder, base, unet

TRAIN_METHODS = ('ae', 'unet', 'ae_unet')


@dataclasses.dataclass
class Record:
  """One row of the benchmark: throughput of semiseg and of its reference, ratio = semiseg / reference."""
  workload: str
  semiseg_per_s: float | None
  reference_per_s: float | None
  unit: str
  device: str
  shapes: str
  reference: str = ''
  compile_s: float | None = None
  gflops_per_call: float | None = None  # XLA's count for the semiseg program (the same network math)
  semiseg_gflop_per_s: float | None = None
  reference_gflop_per_s: float | None = None
  peak_gflop_per_s: float | None = None  # measured fp32 GEMM
  note: str = ''

  @property
  def ratio(self) -> float | None:
    if not self.semiseg_per_s or not self.reference_per_s:
      return None
    return self.semiseg_per_s / self.reference_per_s

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'ratio': self.ratio}


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


def _context(config) -> base.MethodContext:
  return base.MethodContext(image_size=config.data.image_size, texture=False, steps_per_epoch=100)


def _batch(config, seed: int = 0) -> base.Batch:
  rng = np.random.default_rng(seed)
  s, b = config.data.image_size, config.batch_size
  stream = {'image': rng.integers(0, 256, (b, s, s, 3), np.uint8),
            'mask': (rng.random((b, s, s, 1)) > 0.9).astype(np.uint8)}
  return jax.device_put({'labeled': stream, 'unlabeled': dict(stream)})


def create_methods(config) -> dict[str, tuple[base.Method, base.TrainState]]:
  """The three methods with fresh states; ae_unet's frozen AE is an initialised (untrained) AE."""
  ctx = _context(config)
  key = jax.random.PRNGKey(config.seed)
  ae = autoencoder.create(config, ctx)
  ae_state = jax.jit(ae.init)(key)
  seg = unet.create(config, ctx)
  # A copy: the AE's own step donates (deletes) ae_state's buffers.
  both = ae_unet.create_with_ae(config, ctx, jax.tree.map(jnp.copy, ae_state.params))
  both_state = jax.jit(both.init)(key).replace(extras=both.extras)
  return {'ae': (ae, ae_state), 'unet': (seg, jax.jit(seg.init)(key)), 'ae_unet': (both, both_state)}


def _torch_steps(config, torch: Torch):
  from semiseg.bench import torch_reference
  m = config.model
  return torch_reference.TrainSteps(image_size=config.data.image_size, batch_size=config.batch_size,
                                    unet_features=m.unet_features, unet_depth=m.unet_depth,
                                    ae_features=tuple(m.ae_features), latent_dim=m.latent_dim,
                                    device=torch.device)


def _gflop_rates(record: Record, flops: float | None, seconds: float | None, ref_seconds: float | None,
                 peak: float | None) -> Record:
  record.peak_gflop_per_s = peak
  if flops:
    record.gflops_per_call = flops / 1e9
    record.semiseg_gflop_per_s = flops / seconds / 1e9 if seconds else None
    record.reference_gflop_per_s = flops / ref_seconds / 1e9 if ref_seconds else None
  return record


def bench_train(setting: Setting, torch: Torch, peak: float | None,
                methods: tuple[str, ...] = TRAIN_METHODS, trace_dir: str | None = None) -> list[Record]:
  """Steps/s of each method's jitted train step (augmentation included) vs the PyTorch step.

  ``trace_dir``: also records one semiseg step of each method with ``jax.profiler`` into
  ``<trace_dir>/<setting>_<method>`` (open in Perfetto or TensorBoard's profile plugin).
  """
  config = setting.config
  created = create_methods(config)
  batch = _batch(config)
  ref = _torch_steps(config, torch) if torch.module else None
  records = []
  for name in methods:
    method, state = created[name]
    compiled, compile_s, flops = timing.compile_step(method.train_step, state, batch)
    holder = [state]

    def run(compiled=compiled, holder=holder):
      holder[0], metrics = compiled(holder[0], batch)
      jax.block_until_ready((holder[0], metrics))
    first = timing.time_once(run)  # first execution: allocation, thread pools
    fns = {'semiseg': run, 'reference': torch.timed(getattr(ref, f'{name}_step')) if ref else None}
    t = timing.alternating_medians(fns, setting.repeats)
    record = Record(workload=f'train {name}', semiseg_per_s=1 / t['semiseg'],
                    reference_per_s=1 / t['reference'] if t['reference'] else None, unit='steps/s',
                    device=device_name(), shapes=setting.shapes, reference=torch.name or torch.why,
                    compile_s=compile_s,
                    note=f'first step {first:.2f}s; semiseg step includes on-device augmentation')
    records.append(_gflop_rates(record, flops, t['semiseg'], t['reference'], peak))
    if trace_dir:
      with jax.profiler.trace(os.path.join(trace_dir, f'{setting.name}_{name}'), create_perfetto_trace=True):
        run()
    del holder[:]
  return records


def bench_infer(setting: Setting, torch: Torch, peak: float | None, batch_sizes=(1, 16)) -> list[Record]:
  """AE + U-Net score maps (frozen AE difference image + U-Net + sigmoid) per image, jitted vs PyTorch."""
  config = setting.config
  method, state = create_methods(config)['ae_unet']
  ref = _torch_steps(config, torch) if torch.module else None
  records = []
  s = config.data.image_size
  for b in batch_sizes:
    images = jax.random.uniform(jax.random.PRNGKey(b), (b, s, s, 3), jnp.float32)
    lowered = jax.jit(method.predict).lower(state, images)
    compiled = lowered.compile()
    flops = timing.flops_of(compiled)
    fns = {'semiseg': lambda: compiled(state, images).block_until_ready(), 'reference': None}
    if ref:
      timages = torch.module.rand(b, 3, s, s, device=torch.device)
      fns['reference'] = torch.timed(lambda: ref.ae_unet_predict(timages))
    # A large batch takes long at the paper shapes on a CPU: fewer repeats there.
    t = timing.alternating_medians(fns, setting.repeats if b == 1 else max(1, setting.repeats // 2))
    record = Record(workload=f'infer ae_unet b{b}', semiseg_per_s=b / t['semiseg'],
                    reference_per_s=b / t['reference'] if t['reference'] else None, unit='images/s',
                    device=device_name(), shapes=f'{s}px b{b} ' + setting.shapes.split(' ', 2)[2],
                    reference=torch.name or torch.why,
                    note=f'{1e3 * t["semiseg"] / b:.1f} ms/image'
                         + (f' vs {1e3 * t["reference"] / b:.1f}' if t['reference'] else ''))
    records.append(_gflop_rates(record, flops, t['semiseg'], t['reference'], peak))
  return records


def unet_conv_shapes(config, in_channels: int = 6) -> dict[tuple[int, int, int, int, int], int]:
  """The AE + U-Net's 3x3 convolutions as {(B, H, W, Cin, Cout): how many of them}, in network order."""
  m, b, size = config.model, config.batch_size, config.data.image_size
  widths = [m.unet_features * 2 ** level for level in range(m.unet_depth + 1)]
  shapes: dict[tuple[int, int, int, int, int], int] = {}

  def add(level: int, cin: int, cout: int) -> None:
    key = (b, size >> level, size >> level, cin, cout)
    shapes[key] = shapes.get(key, 0) + 1
  for level in range(m.unet_depth + 1):  # the last level is the bottom DoubleConv
    add(level, in_channels if level == 0 else widths[level - 1], widths[level])
    add(level, widths[level], widths[level])
  for level in reversed(range(m.unet_depth)):
    add(level, 2 * widths[level], widths[level])
    add(level, widths[level], widths[level])
  return shapes


CONV_OPS = ('fwd', 'dx', 'dw')


def _conv3x3(x_BxHxWxC, kernel_3x3xIxO):
  # What flax.linen.Conv(features, (3, 3), padding='SAME') computes, without the bias.
  return jax.lax.conv_general_dilated(x_BxHxWxC, kernel_3x3xIxO, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv_inputs(shape: tuple[int, int, int, int, int], seed: int = 0) -> dict[str, np.ndarray]:
  """x [B, H, W, Cin], kernel [3, 3, Cin, Cout] and an output gradient dy [B, H, W, Cout], float32."""
  b, h, w, cin, cout = shape
  rng = np.random.default_rng(seed)
  return {'x': rng.standard_normal((b, h, w, cin), np.float32),
          'kernel': 0.05 * rng.standard_normal((3, 3, cin, cout), np.float32),
          'dy': rng.standard_normal((b, h, w, cout), np.float32)}


def jax_conv_ops(inputs: dict[str, np.ndarray]) -> dict[str, Callable[[], jax.Array]]:
  """Compiled forward, input gradient and weight gradient of the 3x3 convolution, each on its own;
  each call blocks until done and returns the result (NHWC, HWIO)."""
  x, k, dy = (jax.device_put(inputs[n]) for n in ('x', 'kernel', 'dy'))
  fns = {'fwd': (lambda x, k, dy: _conv3x3(x, k)),
         'dx': (lambda x, k, dy: jax.vjp(lambda x: _conv3x3(x, k), x)[1](dy)[0]),
         'dw': (lambda x, k, dy: jax.vjp(lambda k: _conv3x3(x, k), k)[1](dy)[0])}
  compiled = {op: jax.jit(f).lower(x, k, dy).compile() for op, f in fns.items()}
  return {op: (lambda c=c: c(x, k, dy).block_until_ready()) for op, c in compiled.items()}


def torch_conv_ops(torch: Torch, inputs: dict[str, np.ndarray]) -> dict[str, Callable[[], Any]]:
  """The same three in PyTorch (NCHW; the kernels its autograd runs for nn.Conv2d's backward);
  each call returns the result as NHWC / HWIO numpy (the conversion is outside the timed part)."""
  t = torch.module
  x = t.from_numpy(inputs['x'].transpose(0, 3, 1, 2).copy()).to(torch.device)
  k = t.from_numpy(inputs['kernel'].transpose(3, 2, 0, 1).copy()).to(torch.device)
  dy = t.from_numpy(inputs['dy'].transpose(0, 3, 1, 2).copy()).to(torch.device)
  ops = {'fwd': lambda: t.nn.functional.conv2d(x, k, padding=1),
         'dx': lambda: t.nn.grad.conv2d_input(x.shape, k, dy, padding=1),
         'dw': lambda: t.nn.grad.conv2d_weight(x, k.shape, dy, padding=1)}

  def timed(fn):
    def call():
      with t.no_grad():
        return fn()
    return torch.timed(call)
  return {op: timed(fn) for op, fn in ops.items()}


def torch_result_as_jax_layout(op: str, result) -> np.ndarray:
  """A torch_conv_ops result in semiseg's layout: NCHW -> NHWC, [Cout, Cin, 3, 3] -> [3, 3, Cin, Cout]."""
  a = result.detach().cpu().numpy()
  return a.transpose(2, 3, 1, 0) if op == 'dw' else a.transpose(0, 2, 3, 1)


def bench_layers(setting: Setting, torch: Torch, peak: float | None) -> list[Record]:
  """Each distinct 3x3 convolution of the AE + U-Net: forward, input and weight gradient, vs PyTorch.

  Attributes a train step's time to layers and kernels; the ``conv3x3 sum`` rows weight every shape
  by how often the network uses it, i.e. the convolution part of one step.
  """
  records, totals = [], {op: [0.0, 0.0, 0.0] for op in CONV_OPS}  # semiseg s, reference s, flops
  for shape, count in unet_conv_shapes(setting.config).items():
    b, h, w, cin, cout = shape
    inputs = conv_inputs(shape)
    ours = jax_conv_ops(inputs)
    ref = torch_conv_ops(torch, inputs) if torch.module else {}
    flops = 2.0 * b * h * w * cin * cout * 9
    for op in CONV_OPS:
      t = timing.alternating_medians({'semiseg': ours[op], 'reference': ref.get(op)}, setting.repeats)
      totals[op][0] += count * t['semiseg']
      totals[op][1] += count * (t['reference'] or 0.0)
      totals[op][2] += count * flops
      record = Record(workload=f'conv3x3 {op} {h}px {cin}->{cout}', semiseg_per_s=1 / t['semiseg'],
                      reference_per_s=1 / t['reference'] if t['reference'] else None, unit='calls/s',
                      device=device_name(), shapes=f'b{b} {h}x{w} {cin}->{cout}',
                      reference=torch.name or torch.why,
                      note=f'x{count} in the U-Net; {1e3 * t["semiseg"]:.2f} ms'
                           + (f' vs {1e3 * t["reference"]:.2f}' if t['reference'] else ''))
      records.append(_gflop_rates(record, flops, t['semiseg'], t['reference'], peak))
  for op, (ours_s, ref_s, flops) in totals.items():
    ref_s = ref_s if torch.module else None
    record = Record(workload=f'conv3x3 sum {op}', semiseg_per_s=1 / ours_s,
                    reference_per_s=1 / ref_s if ref_s else None, unit='steps/s', device=device_name(),
                    shapes=setting.shapes, reference=torch.name or torch.why,
                    note=f'all 3x3 convs of one AE + U-Net step: {1e3 * ours_s:.1f} ms'
                         + (f' vs {1e3 * ref_s:.1f}' if ref_s else ''))
    records.append(_gflop_rates(record, flops, ours_s, ref_s, peak))
  return records


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
  lines = ['| workload | shapes | semiseg | reference | ratio | unit | GFLOP/s semiseg / ref (peak) '
           '| compile s | note |', '| --- | --- | ---: | ---: | ---: | --- | --- | ---: | --- |']
  for r in records:
    gf = ''
    if r.semiseg_gflop_per_s:
      gf = f'{_fmt(r.semiseg_gflop_per_s)} / {_fmt(r.reference_gflop_per_s)} ({_fmt(r.peak_gflop_per_s)})'
    ratio = f'{r.ratio:.2f}x' if r.ratio else 'n/a'
    lines.append(f'| {r.workload} | {r.shapes} | {_fmt(r.semiseg_per_s)} | {_fmt(r.reference_per_s)} | {ratio} '
                 f'| {r.unit} | {gf} | {_fmt(r.compile_s)} | {r.note} |')
  return '\n'.join(lines)
