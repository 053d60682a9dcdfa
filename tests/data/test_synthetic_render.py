"""The synthetic generator: MVTec layout, deterministic files, non-empty masks, low-contrast defects."""

import os

import numpy as np

from semiseg.data import mvtec_tree, synthetic_render
from semiseg.data.categories import SYNTHETIC_CATEGORIES

COUNTS = {'train': 2, 'test_good': 1, 'defect': 2}


def _files(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      out[os.path.relpath(os.path.join(d, n), root)] = open(os.path.join(d, n), 'rb').read()
  return out


def test_tree_layout_and_determinism(tmp_path):
  a = synthetic_render.generate_tree(str(tmp_path / 'a'), counts=COUNTS, object_size=32, texture_size=48)
  b = synthetic_render.generate_tree(str(tmp_path / 'b'), counts=COUNTS, object_size=32, texture_size=48)
  fa = _files(a)
  assert fa == _files(b)  # bit-identical
  assert not [f for f in os.listdir(a) if f.startswith('.')]  # temp folders gone
  assert mvtec_tree.list_categories(a) == sorted(SYNTHETIC_CATEGORIES)
  for c in SYNTHETIC_CATEGORIES:
    records = mvtec_tree.read_tree(a, c)
    types = {r.defect_type for r in records} - {'good'}
    assert len(types) >= 3
    assert len(records) == 2 + 1 + 2 * len(types)
    for r in records:
      image, mask = mvtec_tree.load_record(r)
      side = 48 if c in synthetic_render.SYNTHETIC_TEXTURES else 32
      assert image.shape == (side, side, 3)
      assert mask.any() == (r.defect_type != 'good')
  c = synthetic_render.generate_tree(str(tmp_path / 'c'), ['washer'], seed=1, counts=COUNTS,
                              object_size=32)
  assert _files(c)['washer/train/good/000.png'] != fa['washer/train/good/000.png']


def test_counts_do_not_move_other_images(tmp_path):
  few = _files(synthetic_render.generate_tree(str(tmp_path / 'few'), ['washer'], counts=COUNTS, object_size=32))
  more = {'train': 3, 'test_good': 2, 'defect': 1}  # more of some folders, fewer of others
  other = _files(synthetic_render.generate_tree(str(tmp_path / 'more'), ['washer'], counts=more, object_size=32))
  common = set(few) & set(other)
  # train/good, test/good, an image and a mask per defect type
  assert set(few) != set(other) and len(common) >= 2 + 1 + 2 * 3
  assert [f for f in sorted(common) if few[f] != other[f]] == []


def test_some_defects_are_low_contrast():
  """Stains change the image by a few grey levels only: a global brightness threshold cannot find them."""
  diffs = []
  for i in range(6):
    rng_args = ('washer', 0, 'test', 'stain', i, 64)
    image, mask = synthetic_render.render(*rng_args)
    inside = image[mask[..., 0] == 1].astype(float).mean()
    ring = image[(mask[..., 0] == 0)].astype(float)
    diffs.append(abs(inside - np.median(ring)))
  assert min(diffs) < 40
