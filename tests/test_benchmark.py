"""Smoke test of the benchmark's plumbing on tiny shapes: records, table, JSON; no timed assertions."""

import json
import os

import jax
import numpy as np
import pytest

import semiseg
from semiseg.bench import suite


@pytest.fixture(scope='module')
def setting():
  from configs import synthetic
  return suite.Setting('smoke', synthetic.get_config('washer,smoke'), repeats=1)


def test_project_xla_flags_are_in_the_environment():
  for flag in semiseg.project_xla_flags():
    assert flag.split('=', 1)[0] in os.environ.get('XLA_FLAGS', '')


def test_train_infer_input_augment_records(setting):
  torch = suite.Torch()
  records = suite.bench_train(setting, torch, peak=1.0)
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
