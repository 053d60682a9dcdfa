"""Writes tiny MVTec-layout trees for tests (random images, blob masks); reads a built TFDS dataset back."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from semiseg.data import tfds_common

# MVTec AD's real folder sizes: train/good, then every test folder (good first), as downloaded.
MVTEC_FOLDER_COUNTS = {
    'bottle': (209, {'good': 20, 'broken_large': 20, 'broken_small': 22, 'contamination': 21}),
    'cable': (224, {'good': 58, 'bent_wire': 13, 'cable_swap': 12, 'combined': 11, 'cut_inner_insulation': 14,
                    'cut_outer_insulation': 10, 'missing_cable': 12, 'missing_wire': 10, 'poke_insulation': 10}),
    'capsule': (219, {'good': 23, 'crack': 23, 'faulty_imprint': 22, 'poke': 21, 'scratch': 23, 'squeeze': 20}),
    'carpet': (280, {'good': 28, 'color': 19, 'cut': 17, 'hole': 17, 'metal_contamination': 17, 'thread': 19}),
    'grid': (264, {'good': 21, 'bent': 12, 'broken': 12, 'glue': 11, 'metal_contamination': 11, 'thread': 11}),
    'hazelnut': (391, {'good': 40, 'crack': 18, 'cut': 17, 'hole': 18, 'print': 17}),
    'leather': (245, {'good': 32, 'color': 19, 'cut': 19, 'fold': 17, 'glue': 19, 'poke': 18}),
    'metal_nut': (220, {'good': 22, 'bent': 25, 'color': 22, 'flip': 23, 'scratch': 23}),
    'pill': (267, {'good': 26, 'color': 25, 'combined': 17, 'contamination': 21, 'crack': 26,
                   'faulty_imprint': 19, 'pill_type': 9, 'scratch': 24}),
    'screw': (320, {'good': 41, 'manipulated_front': 24, 'scratch_head': 24, 'scratch_neck': 25,
                    'thread_side': 23, 'thread_top': 23}),
    'tile': (230, {'good': 33, 'crack': 17, 'glue_strip': 18, 'gray_stroke': 16, 'oil': 18, 'rough': 15}),
    'toothbrush': (60, {'good': 12, 'defective': 30}),
    'transistor': (213, {'good': 60, 'bent_lead': 10, 'cut_lead': 10, 'damaged_case': 10, 'misplaced': 10}),
    'wood': (247, {'good': 19, 'color': 8, 'combined': 11, 'hole': 10, 'liquid': 10, 'scratch': 21}),
    'zipper': (240, {'good': 32, 'broken_teeth': 19, 'combined': 16, 'fabric_border': 17, 'fabric_interior': 16,
                     'rough': 17, 'split_teeth': 18, 'squeezed_teeth': 16}),
}
# MVTec AD's real number of defect types per category.
MVTEC_DEFECT_TYPE_COUNTS = {'bottle': 3, 'cable': 8, 'capsule': 5, 'carpet': 5, 'grid': 5,
                            'hazelnut': 4, 'leather': 5, 'metal_nut': 4, 'pill': 7, 'screw': 5,
                            'tile': 5, 'toothbrush': 1, 'transistor': 4, 'wood': 5, 'zipper': 7}


def write_category(root: str, category: str, defect_types: dict[str, int], *, n_train: int = 4,
                   n_test_good: int = 4, size: int = 8, seed: int = 0, gray: bool = False) -> str:
  """``defect_types`` maps type -> number of images; returns the category folder."""
  rng = np.random.default_rng(seed)
  base = os.path.join(root, category)

  def img() -> Image.Image:
    a = rng.integers(0, 256, (size, size) if gray else (size, size, 3), dtype=np.uint8)
    return Image.fromarray(a)

  for split, t, n in [('train', 'good', n_train), ('test', 'good', n_test_good)] + [
      ('test', t, n) for t, n in defect_types.items()]:
    os.makedirs(os.path.join(base, split, t), exist_ok=True)
    for i in range(n):
      img().save(os.path.join(base, split, t, f'{i:03d}.png'))
      if t != 'good':
        gt = os.path.join(base, 'ground_truth', t)
        os.makedirs(gt, exist_ok=True)
        m = np.zeros((size, size), np.uint8)
        m[size // 4:size // 2, size // 4:size // 2] = 255
        Image.fromarray(m).save(os.path.join(gt, f'{i:03d}_mask.png'))
  return base


def write_mvtec_counts(root: str, categories, size: int = 8) -> str:
  """Categories with MVTec AD's real folder sizes (MVTEC_FOLDER_COUNTS), tiny random images."""
  for c in categories:
    n_train, folders = MVTEC_FOLDER_COUNTS[c]
    write_category(root, c, {t: n for t, n in folders.items() if t != 'good'}, n_train=n_train,
                   n_test_good=folders['good'], size=size, seed=len(c))
  return root


def write_mvtec(root: str, per_type: int = 4, size: int = 8, categories=None) -> str:
  """All (or some) 15 categories with MVTec's real numbers of defect types, ``per_type`` images each."""
  for c in categories or MVTEC_DEFECT_TYPE_COUNTS:
    types = {f'type{j}': per_type for j in range(MVTEC_DEFECT_TYPE_COUNTS[c])}
    write_category(root, c, types, size=size, seed=len(c))
  return root


def read_all(builder) -> dict[str, dict]:
  """{filename: example, with its split} of every example a built TFDS dataset holds."""
  out = {}
  for split, source in builder.as_data_source().items():
    for i in range(len(source)):
      ex = source[i]
      out[tfds_common.decode_str(ex['filename'])] = dict(ex, split=split)
  return out
