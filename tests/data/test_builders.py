"""TFDS builders without TensorFlow: mvtec_ad from a tree and from a tar.xz, synthetic_defects."""

import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from semiseg.data import synthetic_render, tfds_common, tfds_mvtec_ad, tfds_synthetic_defects
from tests.data import fake_tree


def _read_all(builder) -> dict[str, dict]:
  out = {}
  for split, source in builder.as_data_source().items():
    for i in range(len(source)):
      ex = source[i]
      out[tfds_common.decode_str(ex['filename'])] = dict(ex, split=split)
  return out


def _check_mvtec(builder, size):
  rows = _read_all(builder)
  assert sorted(rows) == sorted(
      [f'train/good/{i:03d}.png' for i in range(4)] + [f'test/good/{i:03d}.png' for i in range(4)]
      + [f'test/type{j}/{i:03d}.png' for j in range(3) for i in range(2)])
  for name, ex in rows.items():
    assert ex['image'].shape == (size, size, 3) and ex['image'].dtype == np.uint8
    assert ex['mask'].shape == (size, size, 1) and set(np.unique(ex['mask'])) <= {0, 1}
    kind = tfds_common.decode_str(ex['defect_type'])
    assert name.split('/')[1] == kind
    assert ex['label'] == int(kind != 'good') == int(ex['mask'].any())
    assert ex['split'] == name.split('/')[0]


def test_mvtec_from_tree_and_tar_xz(tmp_path):
  tree = fake_tree.write_mvtec(str(tmp_path / 'manual_tree'), per_type=2, categories=['bottle'])
  config = tfds_mvtec_ad.config_for('bottle', 16)
  b = tfds_mvtec_ad.MvtecAd(config=config, data_dir=str(tmp_path / 'tfds'))
  b.download_and_prepare(file_format='array_record',
                         download_config=tfds.download.DownloadConfig(manual_dir=tree))
  _check_mvtec(b, 16)

  manual = tmp_path / 'manual_tar'
  manual.mkdir()
  with tarfile.open(manual / 'mvtec_anomaly_detection.tar.xz', 'w:xz') as tar:
    tar.add(f'{tree}/bottle', arcname='bottle')
  b = tfds_mvtec_ad.MvtecAd(config=config, data_dir=str(tmp_path / 'tfds_tar'))
  b.download_and_prepare(file_format='array_record',
                         download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  _check_mvtec(b, 16)


def test_mvtec_configs():
  names = [c.name for c in tfds_mvtec_ad.MvtecAd.BUILDER_CONFIGS]
  assert len(names) == 15 and 'bottle' in names
  sizes = {c.name: c.image_size for c in tfds_mvtec_ad.MvtecAd.BUILDER_CONFIGS}
  assert sizes['carpet'] == 512 and sizes['bottle'] == 256
  assert 'mvtec_anomaly_detection.tar.xz' in tfds_mvtec_ad.MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_synthetic_builder(tmp_path):
  config = tfds_synthetic_defects.config_for('pcb', 24, counts={'train': 3, 'test_good': 1, 'defect': 2})
  b = tfds_synthetic_defects.SyntheticDefects(config=config, data_dir=str(tmp_path))
  b.download_and_prepare(file_format='array_record')
  rows = _read_all(b)
  assert len(rows) == 3 + 1 + 2 * 4
  kinds = {tfds_common.decode_str(r['defect_type']) for r in rows.values()}
  assert kinds == {'good', 'scratch', 'hole', 'contamination', 'color'}
  for r in rows.values():
    assert r['image'].shape == (24, 24, 3) and r['mask'].any() == bool(r['label'])
  assert [c.name for c in tfds_synthetic_defects.SyntheticDefects.BUILDER_CONFIGS] == [
      'brick', 'grass', 'gravel', 'washer', 'pcb']


def test_no_tensorflow():
  assert 'tensorflow' not in sys.modules
  r = subprocess.run([sys.executable, '-c', 'import tensorflow'], capture_output=True)
  assert r.returncode != 0, 'TensorFlow is installed; it must not be a dependency.'


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
  assert len(_read_all(b)) == 2 + 1 + 4
  assert seen and all(os.path.dirname(r) == str(temp) for r in seen)  # the tree was made there ...
  assert os.listdir(temp) == []  # ... and is gone, with the builder still alive
  mvtec = tfds_mvtec_ad.MvtecAd(config=tfds_mvtec_ad.config_for('bottle', 16), data_dir=str(tmp_path / 'm'))
  assert not mvtec.data_path.exists() and os.listdir(temp) == []


def test_the_suite_never_uses_the_users_data_dir_or_caches(tmp_path_factory):
  """Datasets are built in this session's tmp_path, whatever SEMISEG_DATA_DIR the developer has set;
  compilation and font caches are the suite's own (tests/conftest.py)."""
  from configs import synthetic
  from semiseg.data import pipeline
  spec = pipeline.DataSpec.from_config(synthetic.get_config('washer,smoke').data)
  assert spec.data_dir is None  # so the builder's data dir is SEMISEG_DATA_DIR
  data_dir = os.path.realpath(str(pipeline.create_builder(spec).data_dir_root))
  assert data_dir.startswith(os.path.realpath(str(tmp_path_factory.getbasetemp())) + os.sep), data_dir
  home = os.path.realpath(os.path.expanduser('~'))
  for var in ('SEMISEG_JAX_CACHE', 'SEMISEG_TEST_JAX_CACHE', 'MPLCONFIGDIR', 'TORCHINDUCTOR_CACHE_DIR'):
    assert not os.path.realpath(os.environ[var]).startswith(os.path.join(home, '.cache')), var
