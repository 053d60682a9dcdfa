"""How much of each embedded defect survives the resize to the network's input size (semiseg/data/visibility.py).

Usage:
  python -m experiments.defect_visibility --sizes=64,128,256 --out runs/visibility.csv

Prints a Markdown table (median over the defects of each type) and writes the CSV atomically.
"""

from __future__ import annotations

from absl import app, flags

from semiseg import report
from semiseg.data import categories, visibility

_SIZES = flags.DEFINE_list('sizes', ['64', '128', '256'], 'Network input sizes (textures: stored at 2x).')
_CATEGORIES = flags.DEFINE_list('categories', list(categories.SYNTHETIC_CATEGORIES), 'Embedded categories.')
_PER_TYPE = flags.DEFINE_integer('per_type', 15, 'Defects measured per defect type (test images 0..N-1).')
_OUT = flags.DEFINE_string('out', None, 'CSV to write (optional).')


def main(argv):
  del argv
  unknown = sorted(set(_CATEGORIES.value) - set(categories.SYNTHETIC_CATEGORIES))
  if unknown:
    raise app.UsageError(f'--categories: {unknown} are not embedded categories; use some of '
                         f'{categories.SYNTHETIC_CATEGORIES}.')
  try:
    sizes = [int(s) for s in _SIZES.value]
  except ValueError:
    raise app.UsageError(f'--sizes must be integers, got {_SIZES.value}.') from None
  if any(s < 8 or s > 256 for s in sizes):
    raise app.UsageError(f'--sizes must lie in [8, 256] (the drawn size), got {sizes}.')
  rows = visibility.table(_CATEGORIES.value, sizes, _PER_TYPE.value)
  header = ['category', 'defect type', 'size', 'contrast at full size', 'contrast kept', 'masks lost', 'mask px']
  body = [[r['category'], r['defect_type'], str(r['image_size']), f"{r['contrast_full']:.0f}",
           f"{100 * r['contrast_kept']:.0f} %", f"{100 * r['mask_lost']:.0f} %", f"{r['area_px']:.0f}"]
          for r in rows]
  print(report.markdown_table(header, body))
  if _OUT.value:
    report.write_csv(_OUT.value, rows, visibility.COLUMNS)
    print(f'Wrote {_OUT.value}.')


if __name__ == '__main__':
  app.run(main)
