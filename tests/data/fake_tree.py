"""Writes tiny MVTec-layout trees for tests (random images, blob masks)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# MVTec AD's real number of defect types per category.
MVTEC_DEFECT_TYPE_COUNTS = {'bottle': 3, 'cable': 8, 'capsule': 5, 'carpet': 5, 'grid': 5,
                            'hazelnut': 4, 'leather': 5, 'metal_nut': 4, 'pill': 7, 'screw': 5,
                            'tile': 5, 'toothbrush': 1, 'transistor': 4, 'wood': 5, 'zipper': 7}


def write_category(root: str, category: str, defect_types: dict[str, int], *, n_train: int = 4,
                   n_test_good: int = 2, size: int = 8, seed: int = 0, gray: bool = False) -> str:
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


def write_mvtec(root: str, per_type: int = 2, size: int = 8, categories=None) -> str:
  """All (or some) 15 categories with MVTec's real numbers of defect types, ``per_type`` images each."""
  for c in categories or MVTEC_DEFECT_TYPE_COUNTS:
    types = {f'type{j}': per_type for j in range(MVTEC_DEFECT_TYPE_COUNTS[c])}
    write_category(root, c, types, size=size, seed=len(c))
  return root
