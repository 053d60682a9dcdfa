"""The shared loop end to end on the embedded dataset: resume is exact, reruns resume, eval is written."""

import json
import os

import jax
import numpy as np
import pytest

from configs import mvtec, synthetic
from semiseg import evaluate, restore, train
from semiseg.data import pipeline
from tests import test_fileio
from tests.methods import test_steps


def unet_config(steps):
  c = synthetic.get_config(f'washer,smoke,method=unet,num_train_steps={steps}')
  c.ckpt.every_steps = 2
  return c


def params_of(result):
  return [np.asarray(x) for x in jax.tree.leaves(result.state.params)]


def test_resume_ends_with_the_same_parameters_as_a_straight_run(tmp_path):
  straight = train.train(unet_config(4), str(tmp_path / 'straight'), progress=False)
  first = train.train(unet_config(2), str(tmp_path / 'resumed'), progress=False)
  assert first.resumed_from is None and int(first.state.step) == 2
  second = train.train(unet_config(4), str(tmp_path / 'resumed'), progress=False)
  assert second.resumed_from == 2 and int(second.state.step) == 4
  for a, b in zip(params_of(straight), params_of(second)):
    np.testing.assert_array_equal(a, b)
  lines = [json.loads(l) for l in open(tmp_path / 'resumed' / 'metrics.jsonl')]
  assert [l['step'] for l in lines] == [2, 4] and all(np.isfinite(l['loss']) for l in lines)
  assert json.load(open(tmp_path / 'straight' / 'split.json'))['labeled']


def test_smoke_twice_in_one_workdir_resumes_and_evaluates(tmp_path):
  config = synthetic.get_config('washer,smoke')  # ae_unet: trains its AE first in <workdir>/ae
  wd = str(tmp_path / 'run')
  r1 = train.train(config, wd, progress=False)
  assert r1.resumed_from is None and os.path.isdir(os.path.join(wd, 'ae', 'ckpt'))
  r2 = train.train(config, wd, progress=False)
  assert r2.resumed_from == config.num_train_steps
  out = evaluate.evaluate(r2.method, r2.state, r2.data, r2.ctx, r2.mesh, config, wd, time_it=False)
  saved = json.load(open(os.path.join(wd, 'eval.json')))
  assert saved['test']['defect_iou'] == pytest.approx(out['test']['defect_iou'])
  assert 0.0 <= out['test']['defect_iou'] <= 1.0 and out['num_test_images'] == len(r2.data.test)
  info = json.load(open(os.path.join(wd, 'run_info.json')))
  assert info['config']['method'] == 'ae_unet' and info['devices']
  _, state, *_ = restore.restore_trained(config, wd)  # the AE restored from <workdir>/ae
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(r2.state)):
    np.testing.assert_array_equal(a, b)
  # Every file the run wrote is strict JSON: eval.json's undefined metrics (the image AUROC of a defect
  # type with one class of image) are null, as is anything undefined in metrics.jsonl.
  assert any(r is None for t in saved['per_defect_type'].values() for r in t.values())
  assert test_fileio.assert_strict_json_files(wd) >= 6  # eval, split, run_info, metrics (run and AE)


def test_restoring_never_trains_a_missing_prerequisite(tmp_path):
  config = synthetic.get_config('washer,smoke')  # ae_unet, whose AE was never trained here
  with pytest.raises(FileNotFoundError, match="prerequisite 'ae' trained there first .*--config.method=ae "
                                              f"--workdir {tmp_path / 'run' / 'ae'}"):
    restore.restore_trained(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'ae' / 'ckpt')


def test_ae_workdir_without_checkpoint_is_a_clear_error(tmp_path):
  config = synthetic.get_config(f'washer,smoke,ae_workdir={tmp_path / "nothing"}')
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    train.train(config, str(tmp_path / 'run'), progress=False)


def test_second_run_on_a_locked_workdir_stops(tmp_path):
  from semiseg import fileio
  with fileio.workdir_lock(str(tmp_path)):
    with pytest.raises(RuntimeError, match='Another run'):
      train.train(unet_config(2), str(tmp_path), progress=False)


@pytest.mark.parametrize('key,value,match', [
    ('data.image_size', 34, 'unet_depth'),
    ('optim.learning_rate', -1.0, 'learning_rate'),
    ('batch_size', 0, 'batch_size'),
])
def test_values_that_cannot_work_name_the_key(tmp_path, key, value, match):
  config = unet_config(2)
  parent, leaf = key.rsplit('.', 1) if '.' in key else (None, key)
  (config[parent] if parent else config)[leaf] = value
  with pytest.raises(ValueError, match=match):
    train.train(config, str(tmp_path), progress=False)


def test_a_checkpoint_past_the_asked_steps_is_refused(tmp_path):
  train.train(unet_config(4), str(tmp_path), progress=False)
  with pytest.raises(ValueError, match='past this config'):
    train.train(unet_config(2), str(tmp_path), progress=False)


@pytest.mark.parametrize('method,key', [('unet', 'unet_depth'), ('ae_unet', 'unet_depth'),
                                        ('pi_model', 'unet_depth'), ('mean_teacher', 'unet_depth'),
                                        ('ae', 'ae_features')])
def test_each_method_checks_its_image_size_before_anything_trains(tmp_path, method, key):
  config = synthetic.get_config(f'washer,smoke,method={method}')
  config.data.image_size = 34  # 34 = 2 * 17: no network of depth >= 2 halves it twice
  with pytest.raises(ValueError, match=key):
    train.train(config, str(tmp_path), progress=False)
  assert not os.path.exists(tmp_path / 'ae')  # ae_unet stopped before training its AE


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
  method, _, ctx, _, total = restore.build(config, None, data=data)
  steps_per_epoch = 3  # ceil(10 unlabeled images / batch 4)
  assert (ctx.steps_per_epoch, total) == (steps_per_epoch, 95 * steps_per_epoch)
  lrs = test_steps.applied_learning_rates(method.train_step.keywords['tx'], total)  # the step's optimizer
  k = np.arange(total) // (30 * steps_per_epoch)  # decays after 30, 60 and 90 epochs
  np.testing.assert_allclose(lrs, 1e-4 * 0.8 ** k, rtol=1e-4)
  assert set(k) == {0, 1, 2, 3}


def test_a_methods_own_num_train_steps_overrides_the_runs():
  """config.anogan.num_train_steps sets AnoGAN's length alone; other methods keep the run's steps,
  and all of them keep the run's epoch (the decay schedule's unit)."""
  c = synthetic.get_config('washer,smoke,method=anogan,num_train_steps=7')
  assert restore.schedule(c, num_unlabeled=20) == (5, 7)  # 20 images / batch 4
  c.anogan.num_train_steps = 30
  assert restore.schedule(c, num_unlabeled=20) == (5, 30)
  c.method = 'unet'
  assert restore.schedule(c, num_unlabeled=20) == (5, 7)
  c.num_train_steps = None
  c.num_epochs = 3
  assert restore.schedule(c, num_unlabeled=20) == (5, 15)


def test_a_methods_own_batch_size_sizes_its_primary_stream_alone():
  """config.anogan.batch_size: AnoGAN's unlabeled batch; the U-Nets keep config.batch_size; a bad value
  names the group's key."""
  c = synthetic.get_config('washer,smoke,method=anogan')
  assert restore.stream_batch_sizes(c, ('unlabeled',)) == {'unlabeled': 4}
  c.anogan.batch_size = 6
  assert restore.stream_batch_sizes(c, ('unlabeled',)) == {'unlabeled': 6}
  assert restore.primary_batch_key(c) == 'config.anogan.batch_size'
  c.method = 'mean_teacher'
  assert restore.stream_batch_sizes(c, ('labeled', 'unlabeled')) == {'labeled': 4, 'unlabeled': 4}
  assert restore.primary_batch_key(c) == 'config.batch_size'
  c.method, c.anogan.batch_size = 'anogan', 0
  with pytest.raises(ValueError, match=r'config.anogan.batch_size must be positive'):
    restore.validate_config(c)


def test_a_bad_channel_reduction_names_its_key():
  c = synthetic.get_config('washer,smoke,method=pca')
  restore.validate_config(c)
  c.model.diff_channels = 'median'
  with pytest.raises(ValueError, match=r"config.model.diff_channels must be one of \('mean', 'max'\), got 'median'"):
    restore.validate_config(c)
