"""The grid's figures from files alone: the curves of each category's first seed in the paper's order,
Figure 6 from the saved inputs and maps (AE's reconstruction, each method's prediction at its threshold)."""

import json
import os

import numpy as np
from PIL import Image

from semiseg import figures, grid


def cell(category, seed, method, variant='main'):
  return grid.Cell('synthetic_defects', category, seed, method, variant)


def write_metrics(path, losses):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    for step, loss in enumerate(losses, 1):
      f.write(json.dumps({'step': step * 10, 'loss': loss}) + '\n')


def test_curves_take_each_categorys_first_seed_in_the_papers_order(tmp_path):
  root = str(tmp_path)
  cells = [cell('washer', s, m) for s in (2, 1) for m in ('ae_unet', 'unet', 'ae')] + [cell('washer', 1, 'unet', 'no_aug')]
  cells += [cell('brick', 0, 'unet')]  # no metrics.jsonl: no curves for brick
  for c in cells:
    if c.category == 'washer':
      write_metrics(os.path.join(c.workdir(root), 'metrics.jsonl'), [1.0, 0.5, 0.25])
  runs = figures.curve_runs(root, cells)
  seed, washer = runs['washer']
  assert seed == 1 and list(washer) == ['ae', 'unet', 'ae_unet']  # the variant's run left out
  assert washer['unet'] == os.path.join(root, 'washer', 'seed1', 'unet', 'metrics.jsonl')
  assert runs['brick'] == (0, {})
  paths = figures.write_curves(root, cells)
  assert paths == {'washer': os.path.join('figures', 'curves_washer.png')}
  assert Image.open(os.path.join(root, paths['washer'])).size[0] > 500


def test_figure6_predictions_are_the_maps_at_their_thresholds(tmp_path, monkeypatch):
  root = str(tmp_path)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
  masks = rng.integers(0, 2, (2, 8, 8), dtype=np.uint8)
  os.makedirs(os.path.join(root, 'washer'))
  np.savez(os.path.join(root, 'washer', 'figure_inputs.npz'), indices=np.array([3, 5]), images=images,
           masks=masks, filenames=np.array(['test/crack/003.png', 'test/hole/005.png']))
  scores = {m: rng.uniform(size=(2, 8, 8)).astype(np.float16) for m in ('unet', 'ae')}
  recon = rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
  cells = [cell('washer', 0, 'unet'), cell('washer', 0, 'ae'), cell('washer', 1, 'ae')]
  for c in cells[:2]:
    os.makedirs(c.workdir(root))
    extra = {'reconstruction': recon} if c.method == 'ae' else {}
    np.savez(os.path.join(c.workdir(root), 'figure_maps.npz'), scores=scores[c.method],
             threshold=np.float32(0.5), **extra)
  seen = {}
  monkeypatch.setattr(figures, 'figure6', lambda path, *args: seen.update(path=path, args=args))
  assert figures.write_figures(root, cells) == {'washer': os.path.join('figures', 'fig6_washer.png')}
  got_images, got_masks, got_recon, preds, titles = seen['args']
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_recon, recon)
  assert list(preds) == ['ae', 'unet'] and titles == ['crack_003', 'hole_005']
  for m in preds:
    np.testing.assert_array_equal(preds[m], scores[m].astype(np.float32) >= 0.5)


def test_the_grids_report_imports_no_jax():
  import subprocess
  import sys
  code = ('import sys, semiseg.grid_report; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "optax", "orbax")))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


def test_write_training_curves_draws_the_runs_that_logged(tmp_path, monkeypatch):
  """A run's curves.png: one panel per metrics.jsonl that exists (the AE beside ae_unet), in the order given;
  nothing is drawn, and None returned, when no run has logged."""
  ae, run = str(tmp_path / 'ae' / 'metrics.jsonl'), str(tmp_path / 'metrics.jsonl')
  files = {'ae': ae, 'ae_unet': run}
  assert figures.write_training_curves(str(tmp_path), files) is None
  write_metrics(run, [1.0, 0.5])
  drawn = []
  real = figures.training_curves
  monkeypatch.setattr(figures, 'training_curves', lambda path, runs, title='': (drawn.append(dict(runs)),
                                                                                 real(path, runs, title)))
  assert figures.write_training_curves(str(tmp_path), files, 'washer') == str(tmp_path / 'curves.png')
  write_metrics(ae, [2.0, 1.0])
  figures.write_training_curves(str(tmp_path), files, 'washer')
  assert drawn == [{'ae_unet': run}, {'ae': ae, 'ae_unet': run}]
  assert Image.open(tmp_path / 'curves.png').size[0] > 300
