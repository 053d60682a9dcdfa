"""The loop's monitor: D's pixel AUROC on the labeled images, logged at log steps; collapse checks."""

import json
import os

import jax
import numpy as np
import pytest

from configs import synthetic
from semiseg import monitor, restore, train


def test_spread_is_zero_for_a_constant_reconstruction():
  rng = np.random.default_rng(1)
  images = rng.random((4, 6, 6, 3))
  assert monitor.spread(np.broadcast_to(images[:1], images.shape)) == 0.0
  assert monitor.spread(images) == pytest.approx(images.std(axis=0).mean())


def _write_metrics(path, losses, spread=None):
  with open(path, 'w') as f:
    for i, loss in enumerate(losses):
      record = {'step': 20 * (i + 1), 'loss': loss}
      if spread is not None:
        record['recon_spread'] = spread
      f.write(json.dumps(record) + '\n')


def test_health_flags_a_loss_that_ends_far_above_its_best(tmp_path):
  # The collapse seen on 128 px photographs: 0.008 by step ~300, then 0.14-0.17 to the end.
  path = str(tmp_path / 'metrics.jsonl')
  _write_metrics(path, [0.05, 0.02, 0.01, 0.008, 0.008, 0.009, 0.008, 0.15, 0.16, 0.14, 0.17, 0.15, 0.16], 0.8)
  h = monitor.health(path, None)
  assert h['collapsed'] and 'ended at' in h['warnings'][0]
  _write_metrics(path, [0.05, 0.02, 0.01, 0.008, 0.007, 0.009, 0.006, 0.007, 0.006], 0.8)
  assert not monitor.health(path, None)['collapsed']  # noisy but no higher than its best
  _write_metrics(path, [0.05, 0.02, 0.01, 0.008, 0.007], 0.01)
  h = monitor.health(path, None)
  assert h['collapsed'] and 'near-constant' in h['warnings'][0]


@pytest.fixture(scope='module')
def selected(tmp_path_factory):
  """A smoke AE + U-Net trained from scratch in one workdir (its AE in <workdir>/ae)."""
  work = str(tmp_path_factory.mktemp('selected'))
  # The paper's AE input (not standardized per image): 8 steps leave its reconstruction near-constant,
  # the collapse the monitor must flag (a standardized AE's output follows each image's mean and spread).
  config = synthetic.get_config('washer,smoke,num_train_steps=2,ae_num_train_steps=8,model.ae_normalize=none')
  result = train.train(config, work, progress=False)
  return config, work, result


def test_d_auroc_is_logged_at_every_log_step(selected):
  config, work, _ = selected
  with open(os.path.join(work, 'ae', 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [2, 4, 6, 8]
  assert all(0.0 <= r['diff_auroc_labeled'] <= 1.0 and r['recon_spread'] >= 0.0 for r in records)


def test_ae_unet_is_built_on_the_last_ae_checkpoint(selected):
  config, work, result = selected
  with open(os.path.join(work, 'ae', 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  health = monitor.read_health(os.path.join(work, 'ae'))
  assert health['diff_auroc_labeled'] == pytest.approx(records[-1]['diff_auroc_labeled'])  # the last value
  assert 'best_step' not in health
  ae_config = train.prerequisites(config)['ae'].config
  ae_state = restore.restore_trained(ae_config, os.path.join(work, 'ae')).state
  assert int(ae_state.step) == 8
  # ae_unet was built on that (the last) AE.
  for a, b in zip(jax.tree.leaves(result.state.extras['ae_params']), jax.tree.leaves(ae_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ae_unet_refuses_a_collapsed_ae_unless_allowed(selected, tmp_path):
  config, work, _ = selected
  assert monitor.read_health(os.path.join(work, 'ae'))['collapsed']  # 8 smoke steps learn nothing
  strict = synthetic.get_config('washer,smoke,num_train_steps=2,ae_num_train_steps=8,model.ae_normalize=none,'
                                'ae_allow_collapsed=false')
  strict.ae_workdir = os.path.join(work, 'ae')
  with pytest.raises(RuntimeError, match=r'collapsed in training .*near-constant.*config.ae_allow_collapsed=True'):
    train.train(strict, str(tmp_path / 'strict'), progress=False)
