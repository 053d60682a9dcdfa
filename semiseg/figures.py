"""Figures: overlays of a score map on its image, the paper's Figure 6 grids, training curves, PNG files
(written atomically)."""

from __future__ import annotations

import io
import json
import math
import os
from collections import defaultdict

import numpy as np

from semiseg import fileio
from semiseg.methods import paper_order
from semiseg.paper_results import COLUMN_NAMES


def write_png(path: str, image_HxWxC: np.ndarray) -> None:
  """A uint8 (or uint16 grayscale) array as a PNG file."""
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image_HxWxC).save(buf, format='PNG')
  fileio.write_bytes_atomic(path, buf.getvalue())


def overlay_image(image_HxWx3: np.ndarray, score_HxW: np.ndarray, pred_HxW: np.ndarray,
                  mask_HxW: np.ndarray | None = None, vmax: float = 1.0, min_side: int = 256) -> np.ndarray:
  """The image under a jet heat map of the score (0..vmax), ground truth contour green, prediction red.

  Small images are enlarged (nearest, integer factor) to at least ``min_side`` so contours stay visible.
  """
  from matplotlib import colormaps
  from skimage.segmentation import find_boundaries
  f = max(1, math.ceil(min_side / max(1, min(image_HxWx3.shape[:2]))))
  up = lambda a: np.repeat(np.repeat(a, f, axis=0), f, axis=1)
  image = up(image_HxWx3).astype(np.float32) / 255.0
  s = np.clip(up(score_HxW).astype(np.float32) / max(vmax, 1e-12), 0.0, 1.0)
  alpha = (0.15 + 0.55 * s)[..., None]  # low scores keep the image visible, high ones show the heat
  out = (1 - alpha) * image + alpha * colormaps['jet'](s)[..., :3]
  width = max(1, f // 2)
  for m, color in ((pred_HxW, (1.0, 0.0, 0.0)), (mask_HxW, (0.0, 1.0, 0.0))):  # ground truth on top
    if m is not None and m.any():
      edge = find_boundaries(up(m.astype(bool)), mode='inner')
      if width > 1:
        from scipy import ndimage
        edge = ndimage.binary_dilation(edge, iterations=width - 1)
      out[edge] = color
  return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def save_overlay(path: str, *args, **kwargs) -> None:
  write_png(path, overlay_image(*args, **kwargs))


def figure6(path: str, images: np.ndarray, masks: np.ndarray, reconstruction: np.ndarray | None,
            predictions: dict[str, np.ndarray], titles: list[str]) -> None:
  """A Figure 6 grid: one row per image; original, AE reconstruction, difference, GT, each method."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  n = len(images)
  cols = [('original', images, None)]
  if reconstruction is not None:
    diff = np.abs(images.astype(np.float32) - reconstruction.astype(np.float32)).mean(-1)
    diff /= np.maximum(diff.reshape(n, -1).max(1), 1e-6)[:, None, None]
    cols += [('AE reconstruction', reconstruction, None), ('difference', diff, 'inferno')]
  cols.append(('ground truth', masks, 'gray'))
  cols += [(COLUMN_NAMES.get(m, m).replace('^', ''), p, 'gray') for m, p in predictions.items()]
  fig, axes = plt.subplots(n, len(cols), figsize=(1.7 * len(cols), 1.8 * n + 0.3), squeeze=False)
  for j, (title, arrays, cmap) in enumerate(cols):
    for i in range(n):
      ax = axes[i, j]
      a = arrays[i]
      ax.imshow(a, cmap=cmap, vmin=0, vmax=1 if cmap else None, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title, fontsize=8)
      if j == 0:
        ax.set_ylabel(titles[i], fontsize=6)
  fig.tight_layout(pad=0.3)
  _save(fig, path)


def _save(fig, path: str) -> None:
  from matplotlib import pyplot as plt
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  plt.close(fig)
  fileio.write_bytes_atomic(path, buf.getvalue())


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl (one JSON object per logged step)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def training_curves(path: str, runs: dict[str, str], title: str = '') -> None:
  """One panel per run: its logged loss against step (log scale), the span after 80 % of the steps
  shaded (where a converged run is flat), and a monitored AUROC (``diff_auroc_labeled``) on a right axis."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  n = len(runs)
  cols = min(n, 4)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows + 0.4), squeeze=False)
  for ax in axes.ravel()[n:]:
    ax.axis('off')
  for ax, (name, metrics_path) in zip(axes.ravel(), runs.items()):
    records = read_metrics(metrics_path)
    steps = np.array([r['step'] for r in records if r.get('loss') is not None])
    loss = np.array([r['loss'] for r in records if r.get('loss') is not None])
    ax.set_title(COLUMN_NAMES.get(name, name).replace('^', ''), fontsize=9)
    if not len(steps):
      continue
    ax.plot(steps, loss, lw=1.0, color='tab:blue')
    if (loss > 0).all():
      ax.set_yscale('log')
    ax.axvspan(0.8 * steps[-1], steps[-1], color='0.9', zorder=0)
    ax.set_xlabel('step', fontsize=7)
    ax.set_ylabel('loss', fontsize=7, color='tab:blue')
    ax.tick_params(which='both', labelsize=6)
    auroc = [(r['step'], r['diff_auroc_labeled']) for r in records if r.get('diff_auroc_labeled') is not None]
    if auroc:
      right = ax.twinx()
      right.plot(*zip(*auroc), lw=1.0, color='tab:orange')
      right.set_ylabel('D AUROC (labeled)', fontsize=7, color='tab:orange')
      right.tick_params(which='both', labelsize=6)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout(pad=0.4)
  _save(fig, path)


def write_training_curves(workdir: str, metrics_files: dict[str, str], title: str = '') -> str | None:
  """``<workdir>/curves.png`` of the runs whose metrics.jsonl exists (``Run.metrics_files``: a run's
  prerequisites, the AE, beside it); its path, or None when none has logged."""
  runs = {name: path for name, path in metrics_files.items() if os.path.exists(path)}
  if not runs:
    return None
  path = os.path.join(workdir, 'curves.png')
  training_curves(path, runs, title=title)
  return path


def figure_indices(defect_types: list[str], masks: np.ndarray, n: int) -> list[int]:
  """Up to ``n`` defective test images, one per defect type in turn (deterministic)."""
  by_type: dict[str, list[int]] = defaultdict(list)
  for i, t in enumerate(defect_types):
    if masks[i].any():
      by_type[t].append(i)
  out, k = [], 0
  while len(out) < n and any(k < len(v) for v in by_type.values()):
    out += [v[k] for _, v in sorted(by_type.items()) if k < len(v)][:n - len(out)]
    k += 1
  return sorted(out)


def flat_name(filename: str) -> str:
  """'test/crack/003.png' -> 'crack_003' (a file name for an overlay)."""
  parts = filename.split('/')
  stem = os.path.splitext('_'.join(parts[1:] if parts[0] in ('test', 'train') else parts))[0]
  return stem.replace(os.sep, '_')


# ----------------------------------------------------------------------------------------------
# The grid's figures, from the files its finished cells left (semiseg/grid_report.py). A cell is any
# object with category, seed, method, variant and workdir(root) (semiseg.grid.Cell).

def write_figures(root: str, cells: list) -> dict[str, str]:
  """figures/fig6_<category>.png from the saved figure inputs and maps; {category: relative path}."""
  out = {}
  for category in dict.fromkeys(c.category for c in cells):
    inputs_path = os.path.join(root, category, 'figure_inputs.npz')
    if not os.path.exists(inputs_path):
      continue
    inputs = np.load(inputs_path)
    if not len(inputs['indices']):
      continue
    seed = min(c.seed for c in cells if c.category == category)
    recon, preds = None, {}
    for c in cells:
      if c.category != category or c.seed != seed or c.variant != 'main':
        continue
      path = os.path.join(c.workdir(root), 'figure_maps.npz')
      if not os.path.exists(path):
        continue
      maps = np.load(path)
      preds[c.method] = maps['scores'].astype(np.float32) >= float(maps['threshold'])
      if 'reconstruction' in maps and (recon is None or c.method == 'ae'):
        recon = maps['reconstruction']
    titles = [flat_name(str(f)) for f in inputs['filenames']]
    rel = os.path.join('figures', f'fig6_{category}.png')
    figure6(os.path.join(root, rel), inputs['images'], inputs['masks'], recon,
            {m: preds[m] for m in paper_order(preds)}, titles)
    out[category] = rel
  return out


def curve_runs(root: str, cells: list) -> dict[str, tuple[int, dict[str, str]]]:
  """{category: (its first seed, {method: metrics.jsonl of that seed's main cell})}, paper order."""
  out = {}
  for category in dict.fromkeys(c.category for c in cells):
    seed = min(c.seed for c in cells if c.category == category)
    runs = {c.method: os.path.join(c.workdir(root), 'metrics.jsonl') for c in cells
            if c.category == category and c.seed == seed and c.variant == 'main'}
    runs = {m: p for m, p in runs.items() if os.path.exists(p)}
    out[category] = (seed, {m: runs[m] for m in paper_order(runs)})
  return out


def write_curves(root: str, cells: list) -> dict[str, str]:
  """figures/curves_<category>.png: every main cell's loss against step (first seed); {category: path}."""
  out = {}
  for category, (seed, runs) in curve_runs(root, cells).items():
    if runs:
      rel = os.path.join('figures', f'curves_{category}.png')
      training_curves(os.path.join(root, rel), runs, title=f'{category}, seed {seed}')
      out[category] = rel
  return out
