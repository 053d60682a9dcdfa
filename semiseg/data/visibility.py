"""Do the defects survive the resize to the network's input size? Measured on the embedded categories.

A user's photographs (a ``folder`` tree, MVTec AD) are resized to ``config.data.image_size`` by the
loader: images with Lanczos (``mvtec_tree.resize_image``), masks by nearest neighbour
(``resize_mask``). A 1-3 px scratch at 256 px is then a fraction of a pixel at 64 px: its contrast is
averaged away and its mask may lose pixels or vanish. Here each defect of the embedded dataset is drawn
at full size (objects 256 px, textures 512 px, as ``generate_category`` writes them), its image with and
without the defect and its mask are resized exactly as the loader does, and what is left is measured:

- ``contrast``: the mean |defect image - same image without it| (channel mean, grey levels) over the
  defect's resized mask, against the same mean at full size (``contrast_kept`` = their ratio);
- ``mask_lost``: the resized mask is empty, so the defect is not in the labels at all;
- ``area_px``: the resized mask's pixel count.

Nothing here trains: it is the data's side of choosing the CPU config's image size
(``python -m experiments.defect_visibility``).
"""

from __future__ import annotations

import numpy as np

from semiseg.data import mvtec_tree, synthetic_render
from semiseg.data.categories import SYNTHETIC_TEXTURES

COLUMNS = ('category', 'defect_type', 'image_size', 'stored_size', 'num_defects', 'contrast_full',
           'contrast', 'contrast_kept', 'mask_lost', 'area_px')


def draw_pair(category: str, defect_type: str, index: int, seed: int = 0):
  """(image without the defect, image with it, bool mask) at full size, float grey levels, exactly as
  ``synthetic_render.render`` draws test image ``index`` of the type (same generator, same draws)."""
  size = 512 if category in SYNTHETIC_TEXTURES else 256
  types = ('good',) + synthetic_render.DEFECT_TYPES[category]
  rng = np.random.default_rng([seed, synthetic_render._category_key(category), 1, types.index(defect_type),
                               index])
  clean, region, behind = synthetic_render._normal(category, rng, size, seed)
  with_defect, mask = synthetic_render._add_defect(defect_type, clean, region, behind, rng)
  return clean, with_defect, mask


def _to_uint8(img: np.ndarray) -> np.ndarray:
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def measure(clean: np.ndarray, with_defect: np.ndarray, mask: np.ndarray, stored_size: int) -> dict:
  """What is left of one defect at ``stored_size`` after the loader's resize (see the module doc)."""
  c8, d8 = _to_uint8(clean), _to_uint8(with_defect)
  full = np.abs(d8.astype(np.float32) - c8.astype(np.float32)).mean(-1)
  contrast_full = float(full[mask].mean())
  c = mvtec_tree.resize_image(c8, stored_size).astype(np.float32)
  d = mvtec_tree.resize_image(d8, stored_size).astype(np.float32)
  m = mvtec_tree.resize_mask(mask.astype(np.uint8)[..., None], stored_size)[..., 0].astype(bool)
  diff = np.abs(d - c).mean(-1)
  contrast = float(diff[m].mean()) if m.any() else 0.0
  return {'contrast_full': contrast_full, 'contrast': contrast,
          'contrast_kept': contrast / contrast_full if contrast_full > 0 else float('nan'),
          'mask_lost': not m.any(), 'area_px': int(m.sum())}


def table(categories, image_sizes, per_type: int = 15, seed: int = 0) -> list[dict]:
  """One row per (category, defect type, image size): medians over ``per_type`` defects, the lost
  masks as a fraction. Textures are measured at their stored size (2x the network input)."""
  rows = []
  for category in categories:
    texture = category in SYNTHETIC_TEXTURES
    for defect_type in synthetic_render.DEFECT_TYPES[category]:
      pairs = [draw_pair(category, defect_type, i, seed) for i in range(per_type)]
      for s in image_sizes:
        stored = 2 * s if texture else s
        got = [measure(*p, stored) for p in pairs]
        rows.append({'category': category, 'defect_type': defect_type, 'image_size': s, 'stored_size': stored,
                     'num_defects': len(got),
                     'contrast_full': float(np.median([g['contrast_full'] for g in got])),
                     'contrast': float(np.median([g['contrast'] for g in got])),
                     'contrast_kept': float(np.median([g['contrast_kept'] for g in got])),
                     'mask_lost': float(np.mean([g['mask_lost'] for g in got])),
                     'area_px': float(np.median([g['area_px'] for g in got]))})
  return rows
