"""predict on a folder: outputs at each image's own size, unreadable files listed, summary rows."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import synthetic
from semiseg import fileio, predict, train


@pytest.fixture(scope='module')
def trained_ae(tmp_path_factory):
  config = synthetic.get_config('washer,smoke,method=ae')
  wd = str(tmp_path_factory.mktemp('ae'))
  train.train(config, wd, progress=False)
  return config, wd


def make_inputs(folder):
  os.makedirs(folder / 'sub')
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(folder / 'rgb.png')
  Image.fromarray(rng.integers(0, 255, (41, 33), dtype=np.uint8)).save(folder / 'sub' / 'gray.jpg')
  (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 20)
  (folder / 'notes.txt').write_text('not an image')


def test_folder_with_good_and_bad_files(trained_ae, tmp_path):
  config, wd = trained_ae
  make_inputs(tmp_path / 'in')
  out = tmp_path / 'out'
  result = predict.predict(config, wd, str(tmp_path / 'in'), str(out), progress=False)
  assert sorted(os.path.basename(f) for f, _ in result.failed) == ['corrupt.png', 'notes.txt']
  assert 'fitted on the' in result.threshold_source  # anomaly method, no eval.json in the workdir
  for stem, (w, h) in (('rgb', (70, 50)), ('sub__gray', (33, 41))):
    for kind in ('mask', 'score', 'overlay'):
      assert Image.open(out / f'{stem}_{kind}.png').size == (w, h), (stem, kind)
    mask = np.asarray(Image.open(out / f'{stem}_mask.png'))
    assert set(np.unique(mask)) <= {0, 255}
  rows = list(csv.DictReader(open(out / 'summary.csv')))
  assert [r['file'] for r in rows] == ['rgb.png', os.path.join('sub', 'gray.jpg')]
  for r in rows:
    assert 0 <= float(r['defect_pixel_fraction']) <= 1 and 0 <= float(r['image_score']) <= 1
  saved = json.load(open(out / 'predict.json'))
  assert len(saved['failed']) == 2 and saved['num_predicted'] == 2


def test_threshold_from_eval_json_and_single_image(trained_ae, tmp_path):
  config, wd = trained_ae
  fileio.write_json_atomic(os.path.join(wd, 'eval.json'), {'method': 'ae', 'threshold': 0.0,
                                                       'threshold_rule': 'labeled'})
  try:
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(tmp_path / 'one.png')
    result = predict.predict(config, wd, str(tmp_path / 'one.png'), str(tmp_path / 'out'), progress=False)
  finally:
    os.remove(os.path.join(wd, 'eval.json'))
  assert result.threshold == 0.0 and 'eval.json' in result.threshold_source
  assert result.rows[0]['defect_pixel_fraction'] == 1.0  # every score >= 0
  assert Image.open(tmp_path / 'out' / 'one_mask.png').size == (24, 20)
