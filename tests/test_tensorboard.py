"""TensorBoard event files: a training run's tb/ holds metrics.jsonl's scalars at their steps, evaluation
adds its numbers and overlays; without tensorboardX, one info line and no tb/ folder. The event files are
read back by hand (TFRecord framing, tensorboardX's Event proto), not by the writer."""

import builtins
import glob
import io
import json
import logging
import os
import struct

import numpy as np
import pytest
from PIL import Image

from configs import synthetic
from semiseg import evaluate, tensorboard, train

tensorboardX = pytest.importorskip('tensorboardX', reason="TensorBoard files need tensorboardX: pip install -e '.[tb]'")
from tensorboardX.proto import event_pb2  # noqa: E402


def read_events(workdir: str) -> tuple[dict, dict]:
  """({tag: {step: value}}, {tag: {step: HxWxC uint8}}) of every event file in ``workdir/tb``."""
  tensorboard.close_all()  # the writers' files complete
  scalars, images = {}, {}
  for path in sorted(glob.glob(os.path.join(workdir, tensorboard.TB_DIR, 'events.out.tfevents.*'))):
    data = open(path, 'rb').read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, the record, its crc
      for v in event.summary.value:
        if v.HasField('image'):
          images.setdefault(v.tag, {})[event.step] = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
        else:
          scalars.setdefault(v.tag, {})[event.step] = v.simple_value
  return scalars, images


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory):
  config = synthetic.get_config('washer,smoke,method=unet')
  wd = str(tmp_path_factory.mktemp('tb'))
  result = train.train(config, wd, progress=False)
  out = evaluate.evaluate(result.method, result.state, result.data, result.ctx, result.mesh, config, wd,
                          time_it=False)
  return wd, out, result


def test_training_scalars_are_those_of_metrics_jsonl(evaluated):
  wd, _, _ = evaluated
  scalars, _ = read_events(wd)
  records = [json.loads(line) for line in open(os.path.join(wd, 'metrics.jsonl'))]
  assert [r['step'] for r in records] == [2, 4]  # smoke: log every 2 steps, 4 steps
  for r in records:
    for key, value in r.items():
      if key in ('step', 'time') or value is None:
        continue
      assert scalars[key][r['step']] == pytest.approx(value, rel=1e-6), key  # float32 in the event


def test_evaluation_adds_its_metrics_and_overlays(evaluated):
  wd, out, result = evaluated
  scalars, images = read_events(wd)
  step = int(result.state.step)
  for key in ('defect_iou', 'miou', 'pixel_auroc'):
    assert scalars[f'eval/test/{key}'][step] == pytest.approx(out['test'][key], rel=1e-6)
  assert scalars['eval/threshold'][step] == pytest.approx(out['threshold'])
  assert 1 <= len(images) <= tensorboard.NUM_OVERLAYS
  for tag, by_step in images.items():
    assert tag.startswith('eval/overlay/') and by_step[step].ndim == 3 and by_step[step].shape[-1] == 3


def test_without_tensorboardx_one_info_line_and_no_files(tmp_path, monkeypatch, caplog):
  real_import = builtins.__import__

  def no_tensorboardx(name, *args, **kwargs):
    if name.startswith('tensorboardX'):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_tensorboardx)
  monkeypatch.setattr(tensorboard, '_missing_logged', False)
  with caplog.at_level(logging.INFO, logger='semiseg.tensorboard'):
    for step in (2, 4):
      tensorboard.write_scalars(str(tmp_path), {'step': step, 'loss': 1.0, 'time': 0.0})
  assert [r.levelno for r in caplog.records] == [logging.INFO]
  assert 'tensorboardX is not installed' in caplog.records[0].getMessage()
  assert not os.path.exists(tmp_path / tensorboard.TB_DIR)
