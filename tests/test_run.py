"""The run record: a config resolved once (category rules, checks, schedule, batch sizes, checkpoint meta)."""

import numpy as np
import pytest

from configs import mvtec, synthetic
from semiseg import restore, run, train
from semiseg.data import categories, pipeline
from tests.methods import test_base


def _data(n_unlabeled=10, n_labeled=3, size=16, texture=False):
  rng = np.random.default_rng(0)
  stored = 2 * size if texture else size

  def split(n):
    return pipeline.Split(images=rng.integers(0, 255, (n, stored, stored, 3), dtype=np.uint8),
                          masks=np.zeros((n, stored, stored, 1), np.uint8), defect_types=['good'] * n,
                          filenames=[f'good/{i}.png' for i in range(n)])
  return pipeline.CategoryData(unlabeled=split(n_unlabeled), labeled=split(n_labeled), test=split(2), manifest={},
                               texture=texture, image_size=size)


def test_a_run_resolves_its_config_once_into_typed_fields(tmp_path):
  """Mean Teacher on a texture: the category's rules applied (texture, no border warp), the schedule
  (ceil(10 unlabeled / batch 4) = 3 steps an epoch), the two streams' batch sizes, and the checkpoint
  meta, each against the numbers written out here."""
  config = synthetic.get_config('grass,smoke,method=mean_teacher,num_train_steps=5')
  config.batch_size, config.unlabeled_batch_size, config.data.image_size = 4, 2, 16
  r = run.resolve(config, str(tmp_path), restore.restore_prerequisites, data=_data(texture=True))
  assert r.config.data.texture is True and categories.settings(r.config).flip_y  # grass: a texture
  assert config.data.get('texture') is None  # the caller's config is left as it was
  assert (r.steps_per_epoch, r.num_train_steps) == (3, 5) and r.ctx.steps_per_epoch == 3
  assert r.batch_sizes == {'labeled': 4, 'unlabeled': 2} and r.images_per_step == 6
  assert r.checkpoint_meta(5, True) == {'step': 5, 'num_train_steps': 5, 'done': True, 'method': 'mean_teacher',
                                        'dataset': 'synthetic_defects', 'category': 'grass', 'image_size': 16,
                                        'seed': config.seed}
  assert r.state is None and r.with_state('s').state == 's' and r.state is None  # frozen: a new record
  assert r.metrics_files == {'mean_teacher': str(tmp_path / 'metrics.jsonl')}
  with pytest.raises(ValueError, match=r"made with category='carpet' .*config.data.category='grass'"):
    r.check_meta({'category': 'carpet'}, 'somewhere')


def test_training_and_restoring_apply_the_category_rules_once_per_run(tmp_path, monkeypatch):
  """Before the run record the rules were applied twice by train and twice more by restore_trained."""
  calls = []
  real = categories.apply_category_rules
  monkeypatch.setattr(categories, 'apply_category_rules', lambda c: calls.append(c.method) or real(c))
  config = synthetic.get_config('washer,smoke,method=pca')
  train.train(config, str(tmp_path), progress=False)
  assert calls == ['pca']
  calls.clear()
  restored = restore.restore_trained(config, str(tmp_path))
  assert calls == ['pca'] and int(restored.state.step) == 1


def test_the_applied_learning_rate_decays_x08_every_30_epochs_of_unlabeled_images():
  """The paper's schedule (4.2: 1e-4, x0.8 every 30 epochs, 200 epochs) as the step applies it, with
  num_epochs setting the length: an epoch is one pass's worth of the unlabeled images at batch_size,
  for the U-Net too (its own stream, 3 labeled images, would make an epoch a single step)."""
  config = mvtec.get_config('bottle,smoke,method=unet')
  config.num_train_steps = None  # the length comes from num_epochs
  config.data.image_size, config.batch_size, config.num_epochs = 16, 4, 95
  assert (config.optim.learning_rate, config.optim.decay_rate, config.optim.decay_every_epochs) == (1e-4, 0.8, 30)
  rng = np.random.default_rng(0)

  def split(n):
    return pipeline.Split(images=rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
                          masks=np.zeros((n, 16, 16, 1), np.uint8), defect_types=['good'] * n,
                          filenames=[f'good/{i}.png' for i in range(n)])
  data = pipeline.CategoryData(unlabeled=split(10), labeled=split(3), test=split(2), manifest={}, texture=False,
                               image_size=16)
  r = run.resolve(config, None, restore.restore_prerequisites, data=data)
  method, ctx, total = r.method, r.ctx, r.num_train_steps
  steps_per_epoch = 3  # ceil(10 unlabeled images / batch 4)
  assert (ctx.steps_per_epoch, total) == (steps_per_epoch, 95 * steps_per_epoch)
  lrs = test_base.applied_learning_rates(method.train_step.keywords['tx'], total)  # the step's optimizer
  k = np.arange(total) // (30 * steps_per_epoch)  # decays after 30, 60 and 90 epochs
  np.testing.assert_allclose(lrs, 1e-4 * 0.8 ** k, rtol=1e-4)
  assert set(k) == {0, 1, 2, 3}


def test_a_methods_own_num_train_steps_overrides_the_runs():
  """config.anogan.num_train_steps sets AnoGAN's length alone; other methods keep the run's steps,
  and all of them keep the run's epoch (the decay schedule's unit)."""
  c = synthetic.get_config('washer,smoke,method=anogan,num_train_steps=7')
  assert run.schedule(c, num_unlabeled=20) == (5, 7)  # 20 images / batch 4
  c.anogan.num_train_steps = 30
  assert run.schedule(c, num_unlabeled=20) == (5, 30)
  c.method = 'unet'
  assert run.schedule(c, num_unlabeled=20) == (5, 7)
  c.num_train_steps = None
  c.num_epochs = 3
  assert run.schedule(c, num_unlabeled=20) == (5, 15)


def test_a_methods_own_batch_size_sizes_its_primary_stream_alone():
  """config.anogan.batch_size: AnoGAN's unlabeled batch; the U-Nets keep config.batch_size; a bad value
  names the group's key."""
  c = synthetic.get_config('washer,smoke,method=anogan')
  assert run.stream_batch_sizes(c, ('unlabeled',)) == {'unlabeled': 4}
  c.anogan.batch_size = 6
  assert run.stream_batch_sizes(c, ('unlabeled',)) == {'unlabeled': 6}
  assert run.primary_batch_key(c) == 'config.anogan.batch_size'
  c.method = 'mean_teacher'
  assert run.stream_batch_sizes(c, ('labeled', 'unlabeled')) == {'labeled': 4, 'unlabeled': 4}
  assert run.primary_batch_key(c) == 'config.batch_size'
  c.method, c.anogan.batch_size = 'anogan', 0
  with pytest.raises(ValueError, match=r'config.anogan.batch_size must be positive'):
    run.validate_config(c)


def test_a_bad_channel_reduction_names_its_key():
  c = synthetic.get_config('washer,smoke,method=pca')
  run.validate_config(c)
  c.model.diff_channels = 'median'
  with pytest.raises(ValueError, match=r"config.model.diff_channels must be one of \('mean', 'max'\), got 'median'"):
    run.validate_config(c)
