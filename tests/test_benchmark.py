"""Smoke test of the benchmark's plumbing on tiny shapes: records, table, JSON; no timed assertions."""

import json
import os
import time

import jax
import numpy as np
import pytest

import semiseg
from semiseg.bench import suite


@pytest.fixture(autouse=True)
def single_call_samples(monkeypatch):
  from semiseg.bench import timing
  monkeypatch.setattr(timing, 'MIN_SAMPLE_S', 0.0)  # plumbing tests: no need for steady state


@pytest.fixture(scope='module')
def setting():
  from configs import synthetic
  return suite.Setting('smoke', synthetic.get_config('washer,smoke'), repeats=1)


def test_project_xla_flags_are_in_the_environment():
  for flag in semiseg.project_xla_flags():
    assert flag.split('=', 1)[0] in os.environ.get('XLA_FLAGS', '')


def test_train_infer_input_augment_records(setting, tmp_path):
  torch = suite.Torch()
  records = suite.bench_train(setting, torch, peak=1.0, trace_dir=str(tmp_path))
  for name in suite.TRAIN_METHODS:  # one profiled step each
    assert list((tmp_path / f'smoke_{name}').rglob('*.trace.json.gz')), name
  records += suite.bench_infer(setting, torch, peak=1.0, batch_sizes=(2,))
  records += suite.bench_input(setting, records[1].semiseg_per_s, steps=2)
  records += suite.bench_augment(batch_size=2, image_size=16, repeats=1)
  assert [r.workload for r in records] == ['train ae', 'train unet', 'train ae_unet', 'infer ae_unet b2',
                                           'input', 'augment']
  for r in records:
    assert r.reference_per_s is None or r.reference_per_s > 0
    if r.workload != 'input':
      assert r.semiseg_per_s > 0
    if torch.module is not None or not r.workload.startswith(('train', 'infer')):
      assert r.ratio is not None
  assert all(r.compile_s > 0 and r.gflops_per_call > 0 for r in records[:3])
  table = suite.markdown(records)
  assert table.count('\n') == len(records) + 1 and '| train unet |' in table
  rows = json.loads(json.dumps([r.to_dict() for r in records]))
  assert {'workload', 'semiseg_per_s', 'reference_per_s', 'ratio', 'unit', 'device', 'shapes'} <= set(rows[0])


def test_scipy_reference_does_the_same_warp():
  from semiseg import augment
  images = np.random.default_rng(0).random((2, 12, 12, 3)).astype(np.float32)
  matrices = augment.sample_matrices(jax.random.PRNGKey(0), 2, augment.AugmentSpec(), (12, 12), (12, 12))
  ours = augment.warp_batch(images, matrices, (12, 12), 1, 'constant')
  np.testing.assert_allclose(ours, suite.scipy_warp_loop(images, np.asarray(matrices)), atol=1e-5)


def test_torch_reference_has_the_same_parameter_count():
  torch_reference = pytest.importorskip('semiseg.bench.torch_reference')
  from semiseg.models.autoencoder import ConvAutoencoder
  from semiseg.models.unet import UNet
  import jax.numpy as jnp

  def count(model, shape):
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))
    return sum(x.size for x in jax.tree.leaves(params))
  assert torch_reference.count_params(torch_reference.UNet(6, 8, 3)) == count(UNet(8, 3), (1, 32, 32, 6))
  assert (torch_reference.count_params(torch_reference.ConvAutoencoder((4, 8), 7, 32))
          == count(ConvAutoencoder((4, 8), 7), (1, 32, 32, 3)))


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
  inputs = suite.conv_inputs(shape, seed=1)
  x, k, dy = inputs['x'], inputs['kernel'], inputs['dy']
  dx, dk = _numpy_conv3x3_grads(x, k, dy)
  expected = {'fwd': _numpy_conv3x3(x, k), 'dx': dx, 'dw': dk}
  ours = suite.jax_conv_ops(inputs)
  for op in suite.CONV_OPS:
    np.testing.assert_allclose(np.asarray(ours[op]()), expected[op], rtol=1e-4, atol=1e-4, err_msg=op)
  torch = suite.Torch()
  if torch.module is not None:  # the reference kernels compute the same three things
    ref = suite.torch_conv_ops(torch, inputs)
    for op in suite.CONV_OPS:
      np.testing.assert_allclose(suite.torch_result_as_jax_layout(op, ref[op]()), expected[op],
                                 rtol=1e-4, atol=1e-4, err_msg=f'torch {op}')


def test_unet_conv_shapes_are_the_unets_3x3_kernels(setting):
  import collections
  import jax.numpy as jnp
  from semiseg.models.unet import UNet
  m, c = setting.config.model, setting.config
  shapes = suite.unet_conv_shapes(c)
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
  records = suite.bench_layers(setting, suite.Torch(), peak=1.0)
  shapes = suite.unet_conv_shapes(setting.config)
  assert len(records) == 3 * len(shapes) + 3
  per_layer, sums = records[:-3], {r.workload.split()[-1]: r for r in records[-3:]}
  assert set(sums) == set(suite.CONV_OPS)
  for op in suite.CONV_OPS:
    rows = [r for r in per_layer if r.workload.split()[1] == op]
    assert len(rows) == len(shapes) and all(r.semiseg_per_s > 0 for r in rows)
    seconds = sum(n / r.semiseg_per_s for r, n in zip(rows, shapes.values()))
    assert sums[op].semiseg_per_s == pytest.approx(1 / seconds)
    flops = sum(n * 2 * b * h * w * ci * co * 9 for (b, h, w, ci, co), n in shapes.items())
    assert sums[op].gflops_per_call == pytest.approx(flops / 1e9)


def test_alternating_medians_samples_back_to_back_and_divides():
  from semiseg.bench import timing
  counts = {'a': 0, 'b': 0}

  def a():
    counts['a'] += 1
    time.sleep(0.002)

  def b():
    counts['b'] += 1
    time.sleep(0.02)
  t = timing.alternating_medians({'a': a, 'b': b, 'c': None}, repeats=3, warmup=1, min_sample_s=0.04)
  assert t['c'] is None
  assert 0.002 <= t['a'] < 0.02 and 0.02 <= t['b'] < 0.2
  # a: 1 warm-up + 3 samples of ceil(0.04 / ~0.002) calls (up to 20 each); b: 1 + 3 x 2 (fewer if slow).
  assert counts['a'] >= 1 + 3 * 2 and counts['a'] > counts['b'] and counts['b'] <= 1 + 3 * 2
