"""The paper's split: k labeled per defect type, the manifest written once and reused."""

import json
import os

import pytest
import tensorflow_datasets as tfds

from semiseg.data import layout, mvtec_ad, split, tfds_common
from tests.data import fake_tree


def _split_of(records, k=1, seed=0, **kw):
  test = [r for r in records if r.split == 'test']
  return split.make_split([r.defect_type for r in test], [r.filename for r in test],
                          [r.filename for r in records if r.split == 'train'], k, seed, **kw)


def test_real_mvtec_counts(tmp_path):
  root = fake_tree.write_mvtec(str(tmp_path), per_type=2, size=8)
  assert layout.list_categories(root) == sorted(fake_tree.MVTEC_DEFECT_TYPE_COUNTS)
  for category, n_types in fake_tree.MVTEC_DEFECT_TYPE_COUNTS.items():
    m = _split_of(layout.read_tree(root, category))
    assert len(m['labeled']) == n_types, category
    assert len({f.split('/')[1] for f in m['labeled']}) == n_types
    assert len(m['test']) == 2 + n_types and len(m['unlabeled']) == 4
    assert not set(m['labeled']) & set(m['test'])
    assert all(f.startswith('train/good/') for f in m['unlabeled'])


def test_through_builder(tmp_path):
  root = fake_tree.write_mvtec(str(tmp_path / 'm'), categories=['pill'])
  b = mvtec_ad.MvtecAd(config=mvtec_ad.config_for('pill', 8), data_dir=str(tmp_path / 'd'))
  b.download_and_prepare(file_format='array_record',
                         download_config=tfds.download.DownloadConfig(manual_dir=root))
  src = b.as_data_source()
  test = [src['test'][i] for i in range(len(src['test']))]
  m = split.make_split([tfds_common.decode_str(e['defect_type']) for e in test],
                       [tfds_common.decode_str(e['filename']) for e in test],
                       [tfds_common.decode_str(e['filename']) for e in src['train']], 1, 0)
  assert len(m['labeled']) == 7
  assert m == _split_of(layout.read_tree(root, 'pill'))


def test_seed_and_k(tmp_path):
  root = str(tmp_path)
  fake_tree.write_category(root, 'c', {'a': 6, 'b': 6})
  records = layout.read_tree(root, 'c')
  assert _split_of(records, 2, 0) == _split_of(records, 2, 0)
  assert len(_split_of(records, 2, 0)['labeled']) == 4
  assert any(_split_of(records, 2, 0)['labeled'] != _split_of(records, 2, s)['labeled']
             for s in range(1, 5))
  with pytest.raises(ValueError, match=r"'a' has 6 .*k_labeled=6"):
    _split_of(records, 6, 0)


def test_manifest_written_once_and_checked(tmp_path):
  root = str(tmp_path / 'r')
  fake_tree.write_category(root, 'c', {'a': 3})
  records = layout.read_tree(root, 'c')
  test = [r for r in records if r.split == 'test']
  args = ([r.defect_type for r in test], [r.filename for r in test],
          [r.filename for r in records if r.split == 'train'])
  work = str(tmp_path / 'w')
  m = split.load_or_create_manifest(work, *args, 1, 0, dataset='folder', category='c')
  with open(os.path.join(work, 'split.json')) as f:
    assert json.load(f) == m
  assert split.load_or_create_manifest(work, *args, 1, 0, dataset='folder', category='c') == m
  with pytest.raises(ValueError, match=r'split.json.*seed'):
    split.load_or_create_manifest(work, *args, 1, 3, dataset='folder', category='c')
  with pytest.raises(ValueError, match=r'split.json.*category'):
    split.load_or_create_manifest(work, *args, 1, 0, dataset='folder', category='d')
  assert not [n for n in os.listdir(work) if n != 'split.json']  # no temp files left
