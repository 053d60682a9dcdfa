"""Loading a category and the batch stream: pure order, exact resume, process shards, prefetch; the
suite's own data dir."""

import itertools
import os

import numpy as np
import pytest

from configs import synthetic
from configs.common import get_base_config
from semiseg.data import pipeline
from tests.data import fake_tree


def _split(n, size=4):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, size, size, 3), np.uint8)
  return pipeline.Split(images, np.zeros((n, size, size, 1), np.uint8), ['good'] * n,
                        [f'{i}' for i in range(n)])


def _ids(batch):
  return batch['image'][:, 0, 0, 0].tolist()


def _take(split, n, **kw):
  return [_ids(b) for b in itertools.islice(pipeline.batch_stream(split, **kw), n)]


@pytest.mark.parametrize('n', [3, 10, 16, 37])
def test_order_pure_and_resumable(n):
  s = _split(n)
  run = _take(s, 12, batch_size=8, seed=1)
  assert run == _take(s, 12, batch_size=8, seed=1, prefetch=0)
  assert run[5:] == _take(s, 7, batch_size=8, seed=1, start_step=5)
  assert run != _take(s, 12, batch_size=8, seed=2)
  for step, ids in enumerate(run):
    assert ids == pipeline.global_indices(n, batch_size=8, seed=1, step=step,
                                          sampling='epoch').tolist()
  if n >= 8:  # an epoch has no repeats, and the remainder is dropped
    per_epoch = n // 8
    first = sum(run[:per_epoch], [])
    assert len(set(first)) == len(first)
  else:  # epochs concatenated: every image once per n positions
    flat = sum(run, [])
    assert all(sorted(flat[i:i + n]) == list(range(n)) for i in range(0, len(flat) - n, n))


def test_process_shards_concatenate():
  s = _split(21)
  full = _take(s, 6, batch_size=8, seed=0)
  shards = [_take(s, 6, batch_size=8, seed=0, process_index=p, process_count=4) for p in range(4)]
  assert all(len(b) == 2 for sh in shards for b in sh)
  assert [sum((sh[i] for sh in shards), []) for i in range(6)] == full
  with pytest.raises(ValueError, match='does not divide by process_count=3'):
    pipeline.batch_stream(s, batch_size=8, seed=0, process_count=3)


def test_replacement_fills_batch_from_split():
  s = _split(3)
  run = _take(s, 20, batch_size=16, seed=0, sampling='replacement')
  assert all(len(b) == 16 and set(b) <= {0, 1, 2} for b in run)
  assert set(sum(run, [])) == {0, 1, 2}
  assert run[4:] == _take(s, 16, batch_size=16, seed=0, sampling='replacement', start_step=4)
  with pytest.raises(ValueError, match="sampling='bogus'"):
    pipeline.batch_stream(s, batch_size=4, seed=0, sampling='bogus')


def test_prefetch_propagates_errors_and_stops():
  s = _split(4)
  s.images = s.images[:2]  # rows 2, 3 missing: the producer thread fails
  stream = pipeline.batch_stream(s, batch_size=4, seed=0)
  with pytest.raises(IndexError):
    for _ in range(3):
      next(stream)
  stream = pipeline.batch_stream(_split(4), batch_size=2, seed=0)
  next(stream)
  stream.close()


def _config(**data):
  c = get_base_config()
  for k, v in data.items():
    c.data[k] = v
  return c.data


def test_load_folder_and_manifest(tmp_path):
  root = str(tmp_path / 'root')
  fake_tree.write_category(root, 'thing', {'a': 5, 'b': 4}, n_train=5, n_test_good=4, size=12, gray=True)
  cfg = _config(name='folder', root=root, category='thing', image_size=8, texture=True)
  data = pipeline.load_category(cfg, str(tmp_path / 'work'))
  # The paper's rule: per folder (a, b, good) 1 labeled and 2 into the unlabeled set.
  assert (len(data.unlabeled), len(data.labeled), len(data.test)) == (5 + 6, 3, 13 - 9)
  assert data.unlabeled.images.shape == (11, 16, 16, 3) and data.labeled.masks.shape == (3, 16, 16, 1)
  assert sorted(data.labeled.defect_types) == ['a', 'b', 'good'] and data.texture and data.image_size == 8
  for i, t in enumerate(data.labeled.defect_types):  # defect masks kept, the good image all normal
    assert data.labeled.masks[i].any() == (t != 'good')
  assert sorted(t for t in data.unlabeled.defect_types if t != 'good') == ['a', 'a', 'b', 'b']
  assert not data.unlabeled.masks.any()  # unlabeled: the moved defect images carry no mask
  assert data.manifest['counts'] == {'unlabeled': 11, 'labeled': 3, 'test': 16, 'test_images': 4}
  again = pipeline.load_category(cfg, str(tmp_path / 'work'))
  assert again.manifest == data.manifest and (again.test.images == data.test.images).all()
  with pytest.raises(ValueError, match=r"valid: \('synthetic_defects', 'mvtec_ad', 'folder'\)"):
    pipeline.load_category(_config(name='nope'), None)
  with pytest.raises(ValueError, match='k_labeled=3'):
    pipeline.load_category(_config(name='folder', root=root, category='thing', k_labeled=3), None)


def test_load_synthetic_and_mvtec(tmp_path, monkeypatch):
  monkeypatch.setenv('SEMISEG_DATA_DIR', str(tmp_path / 'tfds'))
  data = pipeline.load_category(_config(category='washer', image_size=16), None)
  # washer: 200 train, test good 20 and 4 defect types of 15: 5 folders give 1 labeled + 2 unlabeled.
  assert len(data.unlabeled) == 210 and len(data.labeled) == 5 and len(data.test) == 80 - 15
  assert data.test.images.shape[1:] == (16, 16, 3)
  root = fake_tree.write_mvtec(str(tmp_path / 'manual'), categories=['toothbrush'], size=8)
  data = pipeline.load_category(_config(name='mvtec_ad', category='toothbrush', root=root,
                                        image_size=16), None)
  assert (len(data.unlabeled), len(data.labeled), len(data.test)) == (4 + 4, 2, 2)
  assert data.unlabeled.images.shape == (8, 16, 16, 3)
  with pytest.raises(ValueError, match='data.root'):
    pipeline.load_category(_config(name='mvtec_ad', category='bottle'), None)


@pytest.mark.parametrize('prefetch', [0, 2])
def test_prefetched_calls_make_step_after_step_and_raises_its_error_at_next(prefetch):
  calls = []

  def make(step):
    calls.append(step)
    if step == 5:
      raise ValueError('bad batch 5')
    return step * 10
  it = pipeline.prefetched(make, 2, prefetch)
  assert [next(it) for _ in range(3)] == [20, 30, 40]
  with pytest.raises(ValueError, match='bad batch 5'):
    next(it)
  assert calls == [2, 3, 4, 5]


def test_the_suite_never_uses_the_users_data_dir_or_caches(tmp_path_factory):
  """Datasets are built in this session's tmp_path, whatever SEMISEG_DATA_DIR the developer has set;
  compilation and font caches are the suite's own (tests/conftest.py)."""
  spec = pipeline.DataSpec.from_config(synthetic.get_config('washer,smoke').data)
  assert spec.data_dir is None  # so the builder's data dir is SEMISEG_DATA_DIR
  data_dir = os.path.realpath(str(pipeline.create_builder(spec).data_dir_root))
  assert data_dir.startswith(os.path.realpath(str(tmp_path_factory.getbasetemp())) + os.sep), data_dir
  home = os.path.realpath(os.path.expanduser('~'))
  for var in ('SEMISEG_JAX_CACHE', 'SEMISEG_TEST_JAX_CACHE', 'MPLCONFIGDIR', 'TORCHINDUCTOR_CACHE_DIR'):
    assert not os.path.realpath(os.environ[var]).startswith(os.path.join(home, '.cache')), var
