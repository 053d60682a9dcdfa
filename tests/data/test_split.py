"""The paper's split (Table 1) and the manifest written once and reused."""

import json
import os

import pytest
import tensorflow_datasets as tfds

from semiseg import paper_results
from semiseg.data import mvtec_tree, split, tfds_common, tfds_mvtec_ad
from tests.data import fake_tree

MVTEC_TEXTURES = ('carpet', 'grid', 'leather', 'tile', 'wood')


def paper_counts(category):
  p = paper_results.TABLE1_SPLIT[category]  # the paper's Table 1
  return p['unlabeled'], p['labeled'], p['test']


def _split_of(records, k=1, seed=0, **kw):
  test = [r for r in records if r.split == 'test']
  return split.make_split([r.defect_type for r in test], [r.filename for r in test],
                          [r.filename for r in records if r.split == 'train'], k, seed, **kw)


def _names(category):
  """(test types, test filenames, train filenames) with MVTec AD's real folder sizes, no files."""
  n_train, folders = fake_tree.MVTEC_FOLDER_COUNTS[category]
  types = [t for t, n in folders.items() for _ in range(n)]
  files = [f'test/{t}/{i:03d}.png' for t, n in folders.items() for i in range(n)]
  return types, files, [f'train/good/{i:03d}.png' for i in range(n_train)]


@pytest.mark.parametrize('category', sorted(fake_tree.MVTEC_FOLDER_COUNTS))
def test_paper_rule_gives_table1_for_every_mvtec_category(category):
  m = split.make_split(*_names(category), k=1, seed=0)
  got = split.counts(m, test_tiles=4 if category in MVTEC_TEXTURES else 1)
  assert (got['unlabeled'], got['labeled'], got['test']) == paper_counts(category)


def test_table1_by_hand():
  # Bottle: train 209, test folders 20/20/22/21 -> 209 + 4 x 2, 4, 83 - 12 (the worked example).
  assert split.counts(split.make_split(*_names('bottle'), 1, 0)) == {'unlabeled': 217, 'labeled': 4, 'test': 71}
  assert split.counts(split.make_split(*_names('carpet'), 1, 0), 4) == {'unlabeled': 292, 'labeled': 6,
                                                                        'test': 396}
  assert split.counts(split.make_split(*_names('toothbrush'), 1, 0)) == {'unlabeled': 64, 'labeled': 2,
                                                                         'test': 36}


def test_paper_rule_labels_every_folder_and_moves_two(tmp_path):
  root = fake_tree.write_category(str(tmp_path), 'c', {'a': 5, 'b': 6}, n_train=4, n_test_good=5)
  m = _split_of(mvtec_tree.read_tree(root.rsplit('/', 1)[0], 'c'))
  assert m['rule'] == 'paper' and m['test_to_unlabeled'] == 2
  assert sorted(f.split('/')[1] for f in m['labeled']) == ['a', 'b', 'good']
  moved = [f for f in m['unlabeled'] if f.startswith('test/')]
  assert sorted(f.split('/')[1] for f in moved) == ['a', 'a', 'b', 'b', 'good', 'good']
  assert len(m['unlabeled']) == 4 + 6 and len(m['test']) == 16 - 9
  everything = m['unlabeled'] + m['labeled'] + m['test']
  assert len(everything) == len(set(everything)) == 4 + 16


def test_adding_a_folder_moves_no_other_choice():
  types, files, train = _names('bottle')
  before = split.make_split(types, files, train, 1, 0)
  after = split.make_split(types + ['zzz_new'] * 5, files + [f'test/zzz_new/{i}.png' for i in range(5)],
                           train, 1, 0)
  assert set(before['labeled']) < set(after['labeled'])
  assert set(before['unlabeled']) < set(after['unlabeled'])


def test_through_builder(tmp_path):
  root = fake_tree.write_mvtec(str(tmp_path / 'm'), per_type=4, categories=['pill'])
  b = tfds_mvtec_ad.MvtecAd(config=tfds_mvtec_ad.config_for('pill', 8), data_dir=str(tmp_path / 'd'))
  b.download_and_prepare(file_format='array_record',
                         download_config=tfds.download.DownloadConfig(manual_dir=root))
  src = b.as_data_source()
  test = [src['test'][i] for i in range(len(src['test']))]
  m = split.make_split([tfds_common.decode_str(e['defect_type']) for e in test],
                       [tfds_common.decode_str(e['filename']) for e in test],
                       [tfds_common.decode_str(e['filename']) for e in src['train']], 1, 0)
  assert len(m['labeled']) == 8  # 7 defect types and good
  assert m == _split_of(mvtec_tree.read_tree(root, 'pill'))


def test_seed_and_k(tmp_path):
  root = str(tmp_path)
  fake_tree.write_category(root, 'c', {'a': 6, 'b': 6}, n_test_good=6)
  records = mvtec_tree.read_tree(root, 'c')
  assert _split_of(records, 2, 0) == _split_of(records, 2, 0)
  assert len(_split_of(records, 2, 0)['labeled']) == 6
  assert any(_split_of(records, 2, 0)['labeled'] != _split_of(records, 2, s)['labeled']
             for s in range(1, 5))
  with pytest.raises(ValueError, match=r"folder 'a' has 6 .*k_labeled=4 and test_to_unlabeled=2 .*at least 7"):
    _split_of(records, 4, 0)
  with pytest.raises(ValueError, match=r"folder 'a' has 6 .*k_labeled=6 needs at least 7"):
    _split_of(records, 6, 0, test_to_unlabeled=0)


def test_manifest_written_once_and_checked(tmp_path):
  root = str(tmp_path / 'r')
  fake_tree.write_category(root, 'c', {'a': 4})
  records = mvtec_tree.read_tree(root, 'c')
  test = [r for r in records if r.split == 'test']
  args = ([r.defect_type for r in test], [r.filename for r in test],
          [r.filename for r in records if r.split == 'train'])
  work = str(tmp_path / 'w')
  m = split.load_or_create_manifest(work, *args, 1, 0, dataset='folder', category='c')
  with open(os.path.join(work, 'split.json')) as f:
    assert json.load(f) == m
  # 4 train/good; folders a (4) and good (4): 1 labeled and 2 moved to unlabeled each.
  assert m['rule'] == 'paper' and m['counts'] == {'unlabeled': 8, 'labeled': 2, 'test': 2, 'test_images': 2}
  assert split.load_or_create_manifest(work, *args, 1, 0, dataset='folder', category='c') == m
  with pytest.raises(ValueError, match=r'split.json.*seed'):
    split.load_or_create_manifest(work, *args, 1, 3, dataset='folder', category='c')
  with pytest.raises(ValueError, match=r'split.json.*category'):
    split.load_or_create_manifest(work, *args, 1, 0, dataset='folder', category='d')
  with pytest.raises(ValueError, match=r'split.json.*test_to_unlabeled'):
    split.load_or_create_manifest(work, *args, 1, 0, test_to_unlabeled=1, dataset='folder', category='c')
  assert not [n for n in os.listdir(work) if n != 'split.json']  # no temp files left
  # A manifest written before the rule was recorded was made by the former per-defect-type rule: not reused.
  old = {k: v for k, v in m.items() if k not in ('rule', 'test_to_unlabeled', 'counts')}
  with open(os.path.join(work, 'split.json'), 'w') as f:
    json.dump(old, f)
  with pytest.raises(ValueError, match=r"split.json.*rule='k_per_defect' but this run asks for 'paper'"):
    split.load_or_create_manifest(work, *args, 1, 0, dataset='folder', category='c')


def test_folder_config_writes_table1_split(tmp_path):
  """The fidelity check: a user's folder with MVTec AD's folder sizes gives Table 1 in split.json."""
  from configs import folder
  from semiseg.data import pipeline
  cats = ('bottle', 'cable', 'toothbrush', 'carpet', 'wood')
  root = fake_tree.write_mvtec_counts(str(tmp_path / 'mvtec'), cats, size=8)
  for category in cats:
    c = folder.get_config(f'smoke,texture={category in MVTEC_TEXTURES}')
    c.data.root, c.data.category = root, category
    work = str(tmp_path / category)
    pipeline.load_category(c.data, work)
    with open(os.path.join(work, 'split.json')) as f:
      counts = json.load(f)['counts']
    assert (counts['unlabeled'], counts['labeled'], counts['test']) == paper_counts(category)
