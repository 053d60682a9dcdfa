"""The MVTec layout reader: records, colour handling, resizing, and each error naming its file."""

import os

import numpy as np
import pytest
from PIL import Image

from semiseg.data import mvtec_tree
from tests.data import fake_tree


@pytest.fixture
def tree(tmp_path):
  root = str(tmp_path / 'root')
  fake_tree.write_category(root, 'thing', {'scratch': 2, 'crack': 3}, n_train=3, n_test_good=2, size=12)
  return root


def test_read_tree_records(tree):
  records = mvtec_tree.read_tree(tree, 'thing')
  assert mvtec_tree.list_categories(tree) == ['thing']
  assert [r.filename for r in records] == (
      [f'train/good/{i:03d}.png' for i in range(3)] + [f'test/crack/{i:03d}.png' for i in range(3)]
      + [f'test/good/{i:03d}.png' for i in range(2)] + [f'test/scratch/{i:03d}.png' for i in range(2)])
  assert records == mvtec_tree.read_tree(tree, 'thing')  # deterministic
  for r in records:
    assert (r.mask_path is None) == (r.defect_type == 'good')
    assert os.path.isfile(r.path)
  image, mask = mvtec_tree.load_record(records[-1])
  assert image.shape == (12, 12, 3) and image.dtype == np.uint8
  assert mask.shape == (12, 12, 1) and set(np.unique(mask)) == {0, 1}
  image, mask = mvtec_tree.load_record(records[-1], 32)
  assert image.shape == (32, 32, 3) and mask.shape == (32, 32, 1)
  assert set(np.unique(mask)) == {0, 1}  # nearest keeps it binary


def test_grayscale_and_rgba(tmp_path):
  gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
  Image.fromarray(gray).save(tmp_path / 'g.png')
  out = mvtec_tree.load_image(str(tmp_path / 'g.png'))
  assert out.shape == (8, 8, 3) and (out == gray[..., None]).all()
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 200, 10
  Image.fromarray(rgba).save(tmp_path / 'a.png')
  out = mvtec_tree.load_image(str(tmp_path / 'a.png'), 4)
  assert out.shape == (4, 4, 3) and (out[..., 0] == 200).all()
  mask = np.array([[0, 127], [128, 255]], np.uint8)
  Image.fromarray(mask).save(tmp_path / 'm.png')
  assert mvtec_tree.load_mask(str(tmp_path / 'm.png'))[..., 0].tolist() == [[0, 0], [1, 1]]


def test_unknown_category_lists_valid(tree):
  with pytest.raises(mvtec_tree.LayoutError, match=r"'nope'.*\['thing'\]"):
    mvtec_tree.read_tree(tree, 'nope')
  with pytest.raises(mvtec_tree.LayoutError, match='does not exist'):
    mvtec_tree.list_categories(tree + '/missing')


def test_missing_train_good(tree):
  os.rename(os.path.join(tree, 'thing/train/good'), os.path.join(tree, 'thing/train/ok'))
  with pytest.raises(mvtec_tree.LayoutError, match=r'thing/train/good'):
    mvtec_tree.read_tree(tree, 'thing')


def test_empty_folder(tree):
  folder = os.path.join(tree, 'thing/test/crack')
  for n in os.listdir(folder):
    os.remove(os.path.join(folder, n))
  with pytest.raises(mvtec_tree.LayoutError, match=r'thing/test/crack.*no images'):
    mvtec_tree.read_tree(tree, 'thing')


def test_defect_without_mask(tree):
  os.remove(os.path.join(tree, 'thing/ground_truth/scratch/001_mask.png'))
  with pytest.raises(mvtec_tree.LayoutError, match=r'test/scratch/001.png.*001_mask.png'):
    mvtec_tree.read_tree(tree, 'thing')


def test_mask_size_mismatch(tree):
  path = os.path.join(tree, 'thing/ground_truth/crack/000_mask.png')
  Image.fromarray(np.zeros((5, 7), np.uint8)).save(path)
  record = next(r for r in mvtec_tree.read_tree(tree, 'thing') if r.mask_path == path)
  with pytest.raises(mvtec_tree.LayoutError, match=r'000_mask.png.*7x5.*12x12'):
    mvtec_tree.load_record(record)


def test_truncated_and_unreadable(tree):
  path = os.path.join(tree, 'thing/train/good/001.png')
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])
  with pytest.raises(mvtec_tree.LayoutError, match=r'train/good/001.png.*truncated'):
    mvtec_tree.load_image(path)
  open(path, 'wb').write(b'not an image')
  with pytest.raises(mvtec_tree.LayoutError, match=r'train/good/001.png'):
    mvtec_tree.load_image(path)
