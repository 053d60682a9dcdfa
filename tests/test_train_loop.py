"""The loop keeps the device busy: metrics reach the host at log and checkpoint steps only, a non-finite
metric between them still stops the run, and the loop's timing is reported."""

import dataclasses
import glob
import json
import os

import jax.numpy as jnp
import pytest

from configs import synthetic
from semiseg import train


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


def _replace_unet_loss(monkeypatch, loss_fn):
  """Makes unet's train step report ``loss_fn(state_before, state_after, loss)`` as its loss."""
  from semiseg.methods import unet
  create = unet.create

  def create_with_loss(config, ctx):
    method = create(config, ctx)
    step = method.train_step

    def replaced(state, batch):
      new, metrics = step(state, batch)
      return new, {**metrics, 'loss': loss_fn(state, new, metrics['loss'])}
    return dataclasses.replace(method, train_step=replaced)
  monkeypatch.setattr(unet, 'create', create_with_loss)


def test_a_non_finite_loss_between_log_steps_stops_the_run_at_the_next_one(tmp_path, monkeypatch):
  """Step 5's loss alone is NaN (the log step 6 is finite again): the run stops at step 6 naming step 5,
  and keeps the checkpoint of step 4."""
  _replace_unet_loss(monkeypatch, lambda state, new, loss: jnp.where(state.step == 4, jnp.nan, loss))
  with pytest.raises(FloatingPointError,
                     match=r'Non-finite loss at step 5 \(loss=nan\), seen at step 6; the last good checkpoint'):
    train.train(_config(12, 3, 4), str(tmp_path), progress=False)
  assert _ckpt_steps(str(tmp_path)) == [4]
  assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')] == [3, 4]


def test_a_record_holds_each_metrics_mean_over_the_steps_since_the_previous_one(tmp_path, monkeypatch):
  """Every step's loss is replaced by the step number (as float): the record at log step 3 must say
  mean(1, 2, 3) = 2, at checkpoint step 4 just 4, at 6 mean(5, 6), at 8 mean(7, 8), at 9 9."""
  _replace_unet_loss(monkeypatch, lambda state, new, loss: new.step.astype(jnp.float32))
  train.train(_config(9, 3, 4), str(tmp_path), progress=False)
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [(l['step'], l['loss']) for l in lines] == [(3, 2.0), (4, 4.0), (6, 5.5), (8, 7.5), (9, 9.0)]
