"""What the TFDS builders share: no TensorFlow, examples from layout records, nothing left in the temp dir."""

import os
import subprocess
import sys
import tempfile

import numpy as np

from semiseg.data import mvtec_tree, synthetic_render, tfds_common, tfds_mvtec_ad, tfds_synthetic_defects
from tests.data import fake_tree


def test_no_tensorflow():
  assert 'tensorflow' not in sys.modules
  r = subprocess.run([sys.executable, '-c', 'import tensorflow'], capture_output=True)
  assert r.returncode != 0, 'TensorFlow is installed; it must not be a dependency.'


def test_examples_pair_each_record_with_its_own_image_through_the_look_ahead(tmp_path):
  """examples() decodes up to 8 records ahead in threads: with more records than that, each example still
  holds its own record's image and mask (mvtec_tree.load_record, read here one at a time), in the
  records' order, for the chosen split only, labeled 1 exactly when the defect type is not 'good'."""
  tree = fake_tree.write_mvtec(str(tmp_path), per_type=2, categories=['bottle'])  # 4 good + 3 x 2 in test
  records = mvtec_tree.read_tree(tree, 'bottle')
  want = [r for r in records if r.split == 'test']
  assert len(want) > 8 and len(want) < len(records)
  got = list(tfds_common.examples(records, 'test', 8))
  assert [key for key, _ in got] == [r.filename for r in want]
  for (key, ex), r in zip(got, want):
    image, mask = mvtec_tree.load_record(r, 8)
    np.testing.assert_array_equal(ex['image'], image)
    np.testing.assert_array_equal(ex['mask'], mask)
    assert (ex['filename'], ex['defect_type']) == (key, r.defect_type)
    assert ex['label'] == (0 if r.defect_type == 'good' else 1)
  assert {ex['label'] for _, ex in got} == {0, 1}
  assert (tfds_common.decode_str(b'test/good/000.png'), tfds_common.decode_str('x')) == ('test/good/000.png', 'x')


def test_building_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
  """The synthetic tree is generated in the temp dir and deleted when preparation ends (not at exit,
  which tests/conftest.py's os._exit skips); TFDS's look-up of published metadata, which made an empty
  folder there per builder, is skipped."""
  temp = tmp_path / 'temp'
  temp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(temp))
  seen = []
  real = synthetic_render.generate_tree
  monkeypatch.setattr(synthetic_render, 'generate_tree', lambda root, *a, **k: seen.append(root) or real(root, *a, **k))
  config = tfds_synthetic_defects.config_for('washer', 32, counts={'train': 2, 'test_good': 1, 'defect': 1})
  b = tfds_synthetic_defects.SyntheticDefects(config=config, data_dir=str(tmp_path / 'tfds'))
  b.download_and_prepare(file_format='array_record')
  assert len(fake_tree.read_all(b)) == 2 + 1 + 4
  assert seen and all(os.path.dirname(r) == str(temp) for r in seen)  # the tree was made there ...
  assert os.listdir(temp) == []  # ... and is gone, with the builder still alive
  mvtec = tfds_mvtec_ad.MvtecAd(config=tfds_mvtec_ad.config_for('bottle', 16), data_dir=str(tmp_path / 'm'))
  assert not mvtec.data_path.exists() and os.listdir(temp) == []
