"""Renders a contact sheet of one category: good images, defect images, and their masks overlaid.

Usage:
  python -m experiments.show_data --config configs/synthetic.py:brick --out sheet.png
  python -m experiments.show_data --config configs/mvtec.py:bottle --config.data.root=~/mvtec --out b.png
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from semiseg.data import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path:arg).', lock_config=True)
_OUT = flags.DEFINE_string('out', 'sheet.png', 'Where to write the PNG.')
_COLUMNS = flags.DEFINE_integer('columns', 6, 'Images per row.')


def render_sheet(data: pipeline.CategoryData, out: str, columns: int = 6, title: str = '') -> None:
  """Row 1: unlabeled (good) images; rows 2-3: one test image per defect type, plain and overlaid."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  good = list(range(min(columns, len(data.unlabeled))))
  defects, seen = [], set()
  for split in (data.test, data.labeled):
    for i, t in enumerate(split.defect_types):
      if t != 'good' and t not in seen and len(defects) < columns:
        seen.add(t)
        defects.append((split, i))
  fig, axes = plt.subplots(3, columns, figsize=(2 * columns, 6.4), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for j, i in enumerate(good):
    axes[0, j].imshow(data.unlabeled.images[i])
    axes[0, j].set_title('good', fontsize=8)
  for j, (split, i) in enumerate(defects):
    image, mask = split.images[i], split.masks[i, ..., 0].astype(bool)
    axes[1, j].imshow(image)
    axes[1, j].set_title(split.defect_types[i], fontsize=8)
    overlay = image.astype(np.float32)
    overlay[mask] = 0.45 * overlay[mask] + 0.55 * np.array([255, 0, 0])
    axes[2, j].imshow(overlay.astype(np.uint8))
    axes[2, j].set_title('mask', fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  config = _CONFIG.value
  data = pipeline.load_category(config.data, None)
  title = (f'{config.data.name}/{config.data.category}: {len(data.unlabeled)} unlabeled, '
           f'{len(data.labeled)} labeled, {len(data.test)} test')
  render_sheet(data, _OUT.value, _COLUMNS.value, title)
  print(f'Wrote {_OUT.value} ({title}).')


if __name__ == '__main__':
  app.run(main)
