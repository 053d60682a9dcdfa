"""The defect-visibility measurement (semiseg/data/visibility.py) on hand-made cases and the CLI."""

import csv
import os
import subprocess
import sys

import numpy as np

from semiseg.data import synthetic_render, visibility


def test_draw_pair_is_the_rendered_test_image_and_its_clean_twin():
  clean, with_defect, mask = visibility.draw_pair('washer', 'scratch', 3)
  image, want_mask = synthetic_render.render('washer', 0, 'test', 'scratch', 3, 256)
  np.testing.assert_array_equal(np.clip(np.round(with_defect), 0, 255).astype(np.uint8), image)
  np.testing.assert_array_equal(mask, want_mask[..., 0].astype(bool))
  assert (clean[~mask] == with_defect[~mask]).all() and (clean[mask] != with_defect[mask]).any()


def test_measure_on_hand_made_defects():
  grey = np.full((256, 256, 3), 100.0)
  # A 64x64 block aligned to the 4x grid: at 64 px exactly 16x16 mask pixels (nearest neighbour samples
  # source pixel 4k + 2), the interior keeps its +60 and only Lanczos' edge pixels lose some.
  block = np.zeros((256, 256), bool)
  block[64:128, 64:128] = True
  got = visibility.measure(grey, np.where(block[..., None], 160.0, grey), block, 64)
  assert got['area_px'] == 256 and not got['mask_lost']
  assert got['contrast_full'] == 60.0 and 0.8 < got['contrast_kept'] <= 1.0
  # A 1 px line in column 1: nearest neighbour never samples it (columns 2, 6, ...), so its mask is
  # lost at 64 px; at 256 px it is untouched.
  line = np.zeros((256, 256), bool)
  line[:, 1] = True
  dark = np.where(line[..., None], 40.0, grey)
  lost = visibility.measure(grey, dark, line, 64)
  assert lost['mask_lost'] and lost['area_px'] == 0 and lost['contrast'] == 0.0
  same = visibility.measure(grey, dark, line, 256)
  assert same['contrast_kept'] == 1.0 and same['area_px'] == 256


def test_cli_writes_the_table(tmp_path):
  out = tmp_path / 'v.csv'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'experiments.defect_visibility', '--categories=washer',
                         '--sizes=32,64', '--per_type=2', f'--out={out}'], capture_output=True, text=True, env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out, newline='') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(visibility.COLUMNS)
  assert [(r['defect_type'], int(r['image_size'])) for r in rows] == [
      (t, s) for t in synthetic_render.DEFECT_TYPES['washer'] for s in (32, 64)]
  assert all(int(r['num_defects']) == 2 and 0 <= float(r['mask_lost']) <= 1 for r in rows)
  bad = subprocess.run([sys.executable, '-m', 'experiments.defect_visibility', '--categories=bottle'],
                       capture_output=True, text=True, env=env, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert bad.returncode != 0 and 'not embedded categories' in bad.stderr
