"""Each distinct 3x3 convolution of the AE + U-Net's U-Net on its own (forward, input gradient, weight
gradient), beside PyTorch's kernels: attributes a train step's time to layers and kernels."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from semiseg.bench import flops, suite, timing
from semiseg.bench.suite import Record, Setting, Torch, device_name

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


def conv3x3_flops(shape: tuple[int, int, int, int, int]) -> float:
  """Analytic FLOPs of one (B, H, W, Cin, Cout) 3x3 'SAME' convolution (semiseg.bench.flops's convention)."""
  b, h, w, cin, cout = shape
  x = jax.ShapeDtypeStruct((b, h, w, cin), jnp.float32)
  kernel = jax.ShapeDtypeStruct((3, 3, cin, cout), jnp.float32)
  return flops.count(_conv3x3, x, kernel).forward()


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


def bench_layers(setting: Setting, torch: Torch, peaks: dict[str, float | None]) -> list[Record]:
  """Each distinct 3x3 convolution of the AE + U-Net: forward, input and weight gradient, vs PyTorch.

  Attributes a train step's time to layers and kernels; the ``conv3x3 sum`` rows weight every shape
  by how often the network uses it, i.e. the convolution part of one step. Each of the three has the
  analytic FLOPs of the forward (``conv3x3_flops``), fp32.
  """
  records, totals = [], {op: [0.0, 0.0, 0.0] for op in CONV_OPS}  # semiseg s, reference s, flops
  for shape, count in unet_conv_shapes(setting.config).items():
    b, h, w, cin, cout = shape
    inputs = conv_inputs(shape)
    ours = jax_conv_ops(inputs)
    ref = torch_conv_ops(torch, inputs) if torch.module else {}
    flops_per_call = conv3x3_flops(shape)
    for op in CONV_OPS:
      t = timing.alternating_medians({'semiseg': ours[op], 'reference': ref.get(op)}, setting.repeats)
      totals[op][0] += count * t['semiseg']
      totals[op][1] += count * (t['reference'] or 0.0)
      totals[op][2] += count * flops_per_call
      record = Record(workload=f'conv3x3 {op} {h}px {cin}->{cout}', semiseg_per_s=1 / t['semiseg'],
                      reference_per_s=1 / t['reference'] if t['reference'] else None, unit='calls/s',
                      device=device_name(), shapes=f'b{b} {h}x{w} {cin}->{cout}',
                      reference=torch.name or torch.why,
                      note=f'x{count} in the U-Net; {1e3 * t["semiseg"]:.2f} ms'
                           + (f' vs {1e3 * t["reference"]:.2f}' if t['reference'] else ''))
      records.append(suite.gflop_rates(record, flops_per_call, t['semiseg'], t['reference'], peaks))
  for op, (ours_s, ref_s, op_flops) in totals.items():
    ref_s = ref_s if torch.module else None
    record = Record(workload=f'conv3x3 sum {op}', semiseg_per_s=1 / ours_s,
                    reference_per_s=1 / ref_s if ref_s else None, unit='steps/s', device=device_name(),
                    shapes=setting.shapes, reference=torch.name or torch.why,
                    note=f'all 3x3 convs of one AE + U-Net step: {1e3 * ours_s:.1f} ms'
                         + (f' vs {1e3 * ref_s:.1f}' if ref_s else ''))
    records.append(suite.gflop_rates(record, op_flops, ours_s, ref_s, peaks))
  return records


