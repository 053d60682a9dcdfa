"""The U-Net's 3x3 convolutions on their own: the ops against numpy, the shapes against the U-Net's kernels,
the records and their sums."""

import jax
import numpy as np
import pytest

from semiseg.bench import layers, suite


def _numpy_conv3x3(x, k):
  """Cross-correlation with zero padding 1, by shifted products: the independent reference."""
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
  return sum(np.einsum('bhwc,co->bhwo', xp[:, i:i + h, j:j + w], k[i, j]) for i in range(3) for j in range(3))


def _numpy_conv3x3_grads(x, k, dy):
  """dL/dx and dL/dk of sum(dy * conv(x, k)), from the definition."""
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
  dxp = np.zeros_like(xp)
  dk = np.zeros(k.shape, np.float64)
  for i in range(3):
    for j in range(3):
      dk[i, j] = np.einsum('bhwc,bhwo->co', xp[:, i:i + h, j:j + w], dy)
      dxp[:, i:i + h, j:j + w] += np.einsum('bhwo,co->bhwc', dy, k[i, j])
  return dxp[:, 1:-1, 1:-1], dk


def test_conv_ops_compute_the_convolution_and_its_gradients():
  shape = (2, 6, 5, 3, 4)
  inputs = layers.conv_inputs(shape, seed=1)
  x, k, dy = inputs['x'], inputs['kernel'], inputs['dy']
  dx, dk = _numpy_conv3x3_grads(x, k, dy)
  expected = {'fwd': _numpy_conv3x3(x, k), 'dx': dx, 'dw': dk}
  ours = layers.jax_conv_ops(inputs)
  for op in layers.CONV_OPS:
    np.testing.assert_allclose(np.asarray(ours[op]()), expected[op], rtol=1e-4, atol=1e-4, err_msg=op)
  torch = suite.Torch()
  if torch.module is not None:  # the reference kernels compute the same three things
    ref = layers.torch_conv_ops(torch, inputs)
    for op in layers.CONV_OPS:
      np.testing.assert_allclose(layers.torch_result_as_jax_layout(op, ref[op]()), expected[op],
                                 rtol=1e-4, atol=1e-4, err_msg=f'torch {op}')


def test_unet_conv_shapes_are_the_unets_3x3_kernels(setting):
  import collections
  import jax.numpy as jnp
  from semiseg.models.unet import UNet
  m, c = setting.config.model, setting.config
  shapes = layers.unet_conv_shapes(c)
  params = jax.eval_shape(UNet(features=m.unet_features, depth=m.unet_depth).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, c.data.image_size, c.data.image_size, 6)))
  kernels = collections.Counter(tuple(leaf.shape[2:]) for leaf in jax.tree.leaves(params)
                                if leaf.shape[:2] == (3, 3))
  pairs = collections.Counter()
  for (_, _, _, cin, cout), n in shapes.items():
    pairs[(cin, cout)] += n
  assert kernels == pairs
  assert all(b == c.batch_size and h == w and c.data.image_size % h == 0 for b, h, w, _, _ in shapes)


def test_layer_records(setting):
  records = layers.bench_layers(setting, suite.Torch(), {'fp32': 1.0})
  shapes = layers.unet_conv_shapes(setting.config)
  assert len(records) == 3 * len(shapes) + 3
  per_layer, sums = records[:-3], {r.workload.split()[-1]: r for r in records[-3:]}
  assert set(sums) == set(layers.CONV_OPS)
  for op in layers.CONV_OPS:
    rows = [r for r in per_layer if r.workload.split()[1] == op]
    assert len(rows) == len(shapes) and all(r.semiseg_per_s > 0 for r in rows)
    seconds = sum(n / r.semiseg_per_s for r, n in zip(rows, shapes.values()))
    assert sums[op].semiseg_per_s == pytest.approx(1 / seconds)
    # 2 FLOPs per multiply-add over the taps that read an input: 3n - 2 per dimension of n ('SAME' padding).
    flops = sum(n * 2 * b * (3 * h - 2) * (3 * w - 2) * ci * co for (b, h, w, ci, co), n in shapes.items())
    assert sums[op].gflops_per_call == pytest.approx(flops / 1e9)
