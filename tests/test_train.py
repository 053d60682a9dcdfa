"""The shared loop end to end on the embedded dataset: resume is exact, reruns resume, eval is written; the
loop keeps the device busy: metrics reach the host at log and checkpoint steps only, a non-finite metric
between them still stops the run, and the loop's timing is reported."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from semiseg import evaluate, restore, train
from tests import test_fileio


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
  out = evaluate.evaluate_run(r2.run, time_it=False)
  saved = json.load(open(os.path.join(wd, 'eval.json')))
  assert saved['test']['defect_iou'] == pytest.approx(out['test']['defect_iou'])
  assert 0.0 <= out['test']['defect_iou'] <= 1.0 and out['num_test_images'] == len(r2.data.test)
  info = json.load(open(os.path.join(wd, 'run_info.json')))
  assert info['config']['method'] == 'ae_unet' and info['config']['recipe'] == config.recipe and info['devices']
  state = restore.restore_trained(config, wd).state  # the AE restored from <workdir>/ae
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(r2.state)):
    np.testing.assert_array_equal(a, b)
  # Every file the run wrote is strict JSON: eval.json's undefined metrics (the image AUROC of a defect
  # type with one class of image) are null, as is anything undefined in metrics.jsonl.
  assert any(r is None for t in saved['per_defect_type'].values() for r in t.values())
  assert test_fileio.assert_strict_json_files(wd) >= 6  # eval, split, run_info, metrics (run and AE)


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


def _config(steps, log_every, ckpt_every):
  c = synthetic.get_config(f'washer,smoke,method=unet,num_train_steps={steps}')
  c.log_every_steps, c.ckpt.every_steps = log_every, ckpt_every
  return c


def _ckpt_steps(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, 'ckpt', '[0-9]*')))


def test_metrics_reach_the_host_at_log_and_checkpoint_steps_only(tmp_path, monkeypatch):
  flushed = []
  flush = train._flush
  monkeypatch.setattr(train, '_flush', lambda pending, *a, **k: (flushed.append(pending[0]), flush(pending, *a, **k)))
  result = train.train(_config(9, 3, 4), str(tmp_path), progress=False)
  assert flushed == [3, 4, 6, 8, 9]  # log steps 3, 6, 9; checkpoints at 4, 8 and the end
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [l['step'] for l in lines] == [3, 4, 6, 8, 9]
  timing = result.loop_timing
  assert timing.steps == 8 and timing.seconds > 0 and timing.images_per_step == 4 and timing.images_per_s > 0


def test_a_non_finite_loss_between_log_steps_stops_the_run_at_the_next_one(tmp_path, replace_unet_loss):
  """Step 5's loss alone is NaN (the log step 6 is finite again): the run stops at step 6 naming step 5,
  and keeps the checkpoint of step 4."""
  replace_unet_loss(lambda state, new, loss: jnp.where(state.step == 4, jnp.nan, loss))
  with pytest.raises(FloatingPointError,
                     match=r'Non-finite loss at step 5 \(loss=nan\), seen at step 6; the last good checkpoint'):
    train.train(_config(12, 3, 4), str(tmp_path), progress=False)
  assert _ckpt_steps(str(tmp_path)) == [4]
  assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')] == [3, 4]


def test_a_record_holds_each_metrics_mean_over_the_steps_since_the_previous_one(tmp_path, replace_unet_loss):
  """Every step's loss is replaced by the step number (as float): the record at log step 3 must say
  mean(1, 2, 3) = 2, at checkpoint step 4 just 4, at 6 mean(5, 6), at 8 mean(7, 8), at 9 9."""
  replace_unet_loss(lambda state, new, loss: new.step.astype(jnp.float32))
  train.train(_config(9, 3, 4), str(tmp_path), progress=False)
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [(l['step'], l['loss']) for l in lines] == [(3, 2.0), (4, 4.0), (6, 5.5), (8, 7.5), (9, 9.0)]
