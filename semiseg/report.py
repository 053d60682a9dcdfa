"""The paper's tables and figures: run every (category, method, variant, seed) cell, then CSV, Markdown, PNGs."""

from __future__ import annotations

import csv
import dataclasses
import gc
import hashlib
import io as _io
import json
import logging
import math
import os
from collections import defaultdict
from typing import Any, Iterable

import numpy as np
from ml_collections import config_dict
from tqdm.auto import tqdm

from configs import common
from semiseg import io

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# The paper's numbers (Sae-ang et al., Sensors 2022), MVTec AD, 15 categories.

PAPER_COLUMNS = ('PCA', 'AnoGan', 'AE', 'Unet', 'Π^*', 'Mean Teacher', 'AE + Unet')
PAPER_NAME = dict(zip(common.METHODS, PAPER_COLUMNS))  # our method name -> the paper's column name

# Table 2: IoU per category, columns PAPER_COLUMNS.
PAPER_TABLE2 = {
    'bottle': (0.131, 0.008, 0.543, 0.606, 0.605, 0.740, 0.655),
    'cable': (0.090, 0.001, 0.376, 0.696, 0.695, 0.665, 0.695),
    'capsule': (0.048, 0.023, 0.480, 0.545, 0.544, 0.557, 0.579),
    'hazelnut': (0.087, 0.067, 0.437, 0.791, 0.791, 0.769, 0.791),
    'screw': (0.006, 0.008, 0.470, 0.587, 0.585, 0.664, 0.589),
    'pill': (0.090, 0.075, 0.520, 0.631, 0.650, 0.579, 0.759),
    'metal_nut': (0.194, 0.172, 0.519, 0.866, 0.866, 0.568, 0.888),
    'toothbrush': (0.070, 0.038, 0.486, 0.544, 0.544, 0.574, 0.542),
    'transistor': (0.102, 0.071, 0.436, 0.560, 0.530, 0.563, 0.605),
    'zipper': (0.035, 0.001, 0.455, 0.722, 0.720, 0.698, 0.730),
    'grid': (0.009, 0.008, 0.469, 0.533, 0.561, 0.500, 0.636),
    'carpet': (0.017, 0.020, 0.381, 0.713, 0.630, 0.700, 0.681),
    'leather': (0.017, 0.016, 0.462, 0.673, 0.676, 0.666, 0.635),
    'tile': (0.096, 0.065, 0.477, 0.603, 0.746, 0.714, 0.674),
    'wood': (0.070, 0.057, 0.502, 0.591, 0.570, 0.761, 0.652),
    'mean': (0.071, 0.042, 0.467, 0.644, 0.647, 0.6478, 0.666),
}
# Table 1: (unlabeled, labeled, test, % labeled).
PAPER_TABLE1 = {
    'bottle': (217, 4, 71, 1.80), 'cable': (242, 9, 123, 3.58), 'capsule': (231, 6, 114, 2.53),
    'hazelnut': (401, 5, 95, 1.23), 'metal_nut': (230, 5, 100, 2.12), 'pill': (283, 8, 143, 2.74),
    'screw': (332, 6, 142, 1.77), 'toothbrush': (64, 2, 36, 3.03), 'transistor': (223, 5, 85, 2.19),
    'zipper': (256, 8, 127, 3.03), 'carpet': (292, 6, 396, 2.02), 'grid': (276, 6, 240, 2.12),
    'leather': (257, 6, 424, 2.28), 'tile': (242, 6, 396, 2.42), 'wood': (259, 6, 244, 2.26),
}
# Table 3: (Unet train, Unet test, AE + Unet train, AE + Unet test).
PAPER_TABLE3 = {
    'bottle': (0.980, 0.597, 0.987, 0.655), 'cable': (0.968, 0.628, 0.968, 0.695),
    'capsule': (0.938, 0.553, 0.940, 0.579), 'hazelnut': (0.981, 0.785, 0.980, 0.791),
    'screw': (0.940, 0.569, 0.945, 0.589), 'pill': (0.926, 0.597, 0.931, 0.759),
    'metal_nut': (0.990, 0.857, 0.990, 0.888), 'toothbrush': (0.968, 0.481, 0.984, 0.542),
    'transistor': (0.984, 0.558, 0.983, 0.605), 'zipper': (0.966, 0.721, 0.967, 0.730),
    'grid': (0.915, 0.580, 0.921, 0.636), 'carpet': (0.969, 0.598, 0.969, 0.681),
    'leather': (0.956, 0.615, 0.955, 0.635), 'tile': (0.966, 0.634, 0.966, 0.674),
    'wood': (0.978, 0.579, 0.978, 0.652), 'mean': (0.961, 0.623, 0.964, 0.666),
}
# Table 4: (w/o Data Aug, Data Aug, Diff, Original + Diff).
PAPER_TABLE4 = {
    'bottle': (0.583, 0.597, 0.637, 0.655), 'cable': (0.620, 0.628, 0.642, 0.695),
    'capsule': (0.565, 0.553, 0.555, 0.579), 'hazelnut': (0.766, 0.785, 0.701, 0.791),
    'screw': (0.590, 0.569, 0.559, 0.589), 'pill': (0.607, 0.597, 0.579, 0.759),
    'metal_nut': (0.805, 0.857, 0.882, 0.888), 'toothbrush': (0.478, 0.481, 0.532, 0.542),
    'transistor': (0.574, 0.558, 0.587, 0.605), 'zipper': (0.731, 0.721, 0.672, 0.730),
    'grid': (0.563, 0.580, 0.584, 0.636), 'carpet': (0.381, 0.598, 0.619, 0.681),
    'leather': (0.607, 0.615, 0.666, 0.635), 'tile': (0.595, 0.634, 0.669, 0.674),
    'wood': (0.557, 0.579, 0.608, 0.652), 'mean': (0.614, 0.623, 0.632, 0.666),
}

# ----------------------------------------------------------------------------------------------
# Result rows and CSV.

METRICS = ('defect_iou', 'miou', 'dice', 'mae_pixels', 'pixel_auroc', 'aupro', 'pixel_ap',
           'image_auroc', 'f1_max')
KEY_COLUMNS = ('dataset', 'category', 'method', 'variant', 'seed', 'split')
RESULT_COLUMNS = KEY_COLUMNS + METRICS + ('ms_per_image',)
TIMING_COLUMNS = ('dataset', 'category', 'method', 'variant', 'seed', 'device', 'ms_batch_1', 'batch_n',
                  'ms_batch_n')
THRESHOLD_FREE = ('pixel_auroc', 'aupro', 'pixel_ap', 'image_auroc', 'f1_max')
MAIN = 'main'
# Table 4's columns: (title, method, variant). 'Data Aug' and 'Original + Diff' are the main cells.
ABLATION_COLUMNS = (('w/o Data Aug (U-Net)', 'unet', 'no_aug'), ('Data Aug (U-Net)', 'unet', MAIN),
                    ('Diff (AE + U-Net)', 'ae_unet', 'diff'), ('Original + Diff (AE + U-Net)', 'ae_unet', MAIN))


def _ms_batch(ms: dict | None) -> tuple[float, int, float]:
  """(ms at batch 1, the eval batch N, ms at batch N) from eval.json's ``ms_per_image``."""
  if not ms:
    return math.nan, 0, math.nan
  n_key = next((k for k in ms if k.startswith('batch_') and k != 'batch_1'), None)
  b1 = math.nan if ms.get('batch_1') is None else float(ms['batch_1'])
  bn = float(ms[n_key]) if n_key and ms[n_key] is not None else b1
  return b1, int(n_key[len('batch_'):]) if n_key else 1, bn


def rows_from_eval(ev: dict, dataset: str, category: str, method: str, variant: str, seed: int) -> list[dict]:
  """results.csv rows of one cell: the test split, the labeled ('train') images and, for anomaly
  methods, the test-fitted 'oracle' threshold (variant 'oracle', never the main number)."""
  b1, _, bn = _ms_batch(ev.get('ms_per_image'))
  ms = b1 if not math.isnan(b1) else bn
  key = dict(dataset=dataset, category=category, method=method, seed=int(seed))
  out = []
  for split, res, var in (('test', ev['test'], variant), ('train', ev['train'], variant),
                          ('test', (ev.get('oracle') or {}).get('test'),
                           'oracle' if variant == MAIN else f'{variant}_oracle')):
    if res is None:
      continue
    out.append({**key, 'variant': var, 'split': split, **{m: float(res.get(m, math.nan)) for m in METRICS},
                'ms_per_image': ms})
  return out


def timing_from_eval(ev: dict, dataset: str, category: str, method: str, variant: str, seed: int) -> dict:
  b1, n, bn = _ms_batch(ev.get('ms_per_image'))
  return dict(dataset=dataset, category=category, method=method, variant=variant, seed=int(seed),
              device=(ev.get('ms_per_image') or {}).get('device', ''), ms_batch_1=b1, batch_n=n, ms_batch_n=bn)


def write_csv(path: str, rows: Iterable[dict], columns: tuple[str, ...]) -> None:
  buf = _io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction='ignore', lineterminator='\n')
  w.writeheader()
  for r in rows:
    w.writerow({k: ('' if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
  io.write_text_atomic(path, buf.getvalue())


def read_csv(path: str) -> list[dict]:
  """Rows with numbers as float (empty = nan) and ``seed`` as int."""
  text_columns = {'dataset', 'category', 'method', 'variant', 'split', 'device'}
  rows = []
  with open(path, newline='') as f:
    for r in csv.DictReader(f):
      rows.append({k: (v if k in text_columns else int(v) if k in ('seed', 'batch_n')
                       else float(v) if v != '' else math.nan) for k, v in r.items()})
  return rows


# ----------------------------------------------------------------------------------------------
# Statistics over seeds.

@dataclasses.dataclass(frozen=True)
class Stat:
  mean: float
  std: float  # sample std (ddof=1) over seeds; nan with one seed
  n: int


def stat(values: list[float]) -> Stat:
  a = np.asarray(values, np.float64)
  if a.size == 0:
    return Stat(math.nan, math.nan, 0)
  return Stat(float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan, int(a.size))


def seed_stats(rows: list[dict], metric: str, *, split: str = 'test', variant: str = MAIN
               ) -> dict[tuple[str, str], Stat]:
  """(category, method) -> mean and sample std over seeds of ``metric``."""
  groups: dict[tuple[str, str], list[float]] = defaultdict(list)
  for r in rows:
    if r['split'] == split and r['variant'] == variant:
      groups[(r['category'], r['method'])].append(r[metric])
  return {k: stat(v) for k, v in groups.items()}


def category_mean_stats(rows: list[dict], metric: str, categories: list[str], *, split: str = 'test',
                        variant: str = MAIN) -> dict[str, Stat]:
  """method -> stats over seeds of the mean over ``categories`` (seeds missing a category are left out)."""
  per: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
  for r in rows:
    if r['split'] == split and r['variant'] == variant:
      per[(r['method'], r['seed'])][r['category']] = r[metric]
  by_method: dict[str, list[float]] = defaultdict(list)
  for (method, _), values in sorted(per.items()):
    if all(c in values for c in categories):
      by_method[method].append(float(np.mean([values[c] for c in categories])))
  return {m: stat(v) for m, v in by_method.items()}


def fmt(s: Stat | None, digits: int = 3) -> str:
  if s is None or s.n == 0 or math.isnan(s.mean):
    return '–'
  if s.n == 1 or math.isnan(s.std):
    return f'{s.mean:.{digits}f}'
  return f'{s.mean:.{digits}f} ± {s.std:.{digits}f}'


def markdown_table(header: list[str], body: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '| ' + ' | '.join('---' for _ in header) + ' |']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in body]
  return '\n'.join(lines)


def ordered_methods(rows: list[dict]) -> list[str]:
  present = {r['method'] for r in rows}
  return [m for m in common.METHODS if m in present] + sorted(present - set(common.METHODS))


def ordered_categories(rows: list[dict]) -> list[str]:
  seen: dict[str, None] = {}
  for r in rows:
    seen.setdefault(r['category'], None)
  return list(seen)


# ----------------------------------------------------------------------------------------------
# Tables.

def _paper(table: dict, category: str, i: int) -> str:
  row = table.get(category)
  return '–' if row is None else f'{row[i]:.3f}'


def metric_table(rows: list[dict], metric: str, *, split: str = 'test', variant: str = MAIN,
                 paper: dict | None = None, digits: int = 3) -> str:
  """Category x method of ``metric`` (mean ± std over seeds) with a mean row; ``paper`` columns
  (PAPER_TABLE2's layout) alongside each method where given."""
  categories, methods = ordered_categories(rows), ordered_methods(rows)
  stats = seed_stats(rows, metric, split=split, variant=variant)
  means = category_mean_stats(rows, metric, categories, split=split, variant=variant)
  methods = [m for m in methods if any((c, m) in stats for c in categories)]
  header = ['category']
  for m in methods:
    header.append(m)
    if paper is not None and m in PAPER_NAME:
      header.append(f'paper {PAPER_NAME[m]}')
  body = []
  for c in categories + ['mean']:
    row = [f'**{c}**' if c == 'mean' else c]
    for m in methods:
      row.append(fmt(means.get(m) if c == 'mean' else stats.get((c, m)), digits))
      if paper is not None and m in PAPER_NAME:
        row.append(_paper(paper, c, common.METHODS.index(m)))
    body.append(row)
  return markdown_table(header, body)


def table1(counts: dict[str, dict], mvtec: bool) -> str:
  header = ['category', 'unlabeled', 'labeled', 'test', '% labeled']
  if mvtec:
    header += ['paper unlabeled', 'paper labeled', 'paper test', 'paper % labeled']
  body = []
  for c, n in counts.items():
    u, l, t = n['unlabeled'], n['labeled'], n['test']
    row = [c, u, l, t, f'{100.0 * l / max(u + l, 1):.2f}']
    if mvtec:
      p = PAPER_TABLE1.get(c)
      row += list(p[:3]) + [f'{p[3]:.2f}'] if p else ['–'] * 4
    body.append(row)
  return markdown_table(header, body)


def table3(rows: list[dict], mvtec: bool) -> str:
  categories = ordered_categories(rows)
  cols = [('unet', 'train'), ('unet', 'test'), ('ae_unet', 'train'), ('ae_unet', 'test')]
  stats = {(m, s): seed_stats(rows, 'defect_iou', split=s) for m, s in cols}
  means = {(m, s): category_mean_stats(rows, 'defect_iou', categories, split=s) for m, s in cols}
  header = ['category', 'U-Net train', 'U-Net test', 'AE + U-Net train', 'AE + U-Net test']
  if mvtec:
    header += [f'paper {h}' for h in header[1:]]
  body = []
  for c in categories + ['mean']:
    row = [f'**{c}**' if c == 'mean' else c]
    row += [fmt(means[k].get(k[0]) if c == 'mean' else stats[k].get((c, k[0]))) for k in cols]
    if mvtec:
      row += [_paper(PAPER_TABLE3, c, i) for i in range(4)]
    body.append(row)
  return markdown_table(header, body)


def table4(rows: list[dict], mvtec: bool) -> str:
  categories = ordered_categories(rows)
  stats = {(m, v): seed_stats(rows, 'defect_iou', variant=v) for _, m, v in ABLATION_COLUMNS}
  means = {(m, v): category_mean_stats(rows, 'defect_iou', categories, variant=v) for _, m, v in ABLATION_COLUMNS}
  header = ['category'] + [t for t, _, _ in ABLATION_COLUMNS]
  if mvtec:
    header += [f'paper {t.split(" (")[0]}' for t, _, _ in ABLATION_COLUMNS]
  body = []
  for c in categories + ['mean']:
    row = [f'**{c}**' if c == 'mean' else c]
    row += [fmt(means[(m, v)].get(m) if c == 'mean' else stats[(m, v)].get((c, m))) for _, m, v in ABLATION_COLUMNS]
    if mvtec:
      row += [_paper(PAPER_TABLE4, c, i) for i in range(4)]
    body.append(row)
  return markdown_table(header, body)


def table_a1(timing: list[dict]) -> str:
  """ms per image, batch 1 and the eval batch, mean over seeds."""
  categories, methods = ordered_categories(timing), ordered_methods(timing)
  cell: dict[tuple[str, str], tuple[list, list, int]] = {}
  for t in timing:
    if t['variant'] != MAIN:
      continue
    b1, bn, _ = cell.setdefault((t['category'], t['method']), ([], [], t['batch_n']))
    b1.append(t['ms_batch_1'])
    bn.append(t['ms_batch_n'])
  header = ['category'] + methods
  body = []
  for c in categories:
    row = [c]
    for m in methods:
      if (c, m) not in cell:
        row.append('–')
        continue
      b1, bn, n = cell[(c, m)]
      row.append(f'{fmt(stat(b1), 1)} / {fmt(stat(bn), 1)}')
    body.append(row)
  return markdown_table(header, body)


def threshold_free_table(rows: list[dict]) -> str:
  categories, methods = ordered_categories(rows), ordered_methods(rows)
  stats = {m: seed_stats(rows, m) for m in THRESHOLD_FREE}
  body = [[c, m] + [fmt(stats[k].get((c, m))) for k in THRESHOLD_FREE]
          for c in categories for m in methods if (c, m) in stats[THRESHOLD_FREE[0]]]
  return markdown_table(['category', 'method', 'pixel AUROC', 'AUPRO (FPR ≤ 0.3)', 'pixel AP',
                         'image AUROC', 'F1-max'], body)


def build_markdown(*, dataset: str, rows: list[dict], timing: list[dict], counts: dict[str, dict],
                   figures: dict[str, str], overlay_dir: str | None, notes: list[str]) -> str:
  """report.md: every table of the paper, our numbers as mean ± sample std (ddof=1) over seeds."""
  mvtec = dataset == 'mvtec_ad'
  seeds = sorted({r['seed'] for r in rows})
  devices = sorted({t['device'] for t in timing if t['device']})
  batch_ns = sorted({t['batch_n'] for t in timing if t['batch_n']})
  has = lambda m, v=MAIN: any(r['method'] == m and r['variant'] == v for r in rows)
  out = [f'# Reproduction report: {dataset}', '',
         f'Seeds {seeds}: numbers are the mean ± sample standard deviation (ddof=1) over seeds (one seed: '
         'the value alone). The seed sets model initialisation, augmentation and batch order; the split '
         '(`data.split_seed`) is the same for every seed and method, so the spread is training variance. '
         'IoU is summed over all test pixels of a category. Probability methods are thresholded at '
         '`config.threshold`; anomaly-score methods (PCA, AnoGAN, AE) at the threshold fitted on the '
         'labeled images (max TPR − FPR, the paper\'s rule). Raw numbers: `results.csv`, `timing.csv`.', '']
  if notes:
    out += ['Notes:', ''] + [f'- {n}' for n in notes] + ['']
  out += ['## Table 1: unlabeled / labeled / test images', '',
          'The paper\'s split: for every test folder, good included, 1 image labeled and 2 moved into the '
          'unlabeled set; textures count each test image as its 4 tiles. % labeled = labeled / (unlabeled + '
          'labeled), rounded (the paper\'s column matches this formula truncated to 2 decimals).', '',
          table1(counts, mvtec), '']
  out += ['## Table 2: defect-class IoU (test split)', '',
          'IoU of the defect class, TP / (TP + FP + FN)' + (' with the paper\'s Table 2 alongside ("paper ...", '
                                                             'the paper\'s column names).' if mvtec else '.'),
          '', metric_table(rows, 'defect_iou', paper=PAPER_TABLE2 if mvtec else None), '']
  out += ['## Table 2b: two-class mean IoU (defect, non-defect), test split', '',
          'The paper says "mean IoU"; this is the mean of the defect and non-defect IoUs.', '',
          metric_table(rows, 'miou'), '']
  if any(r['variant'] == 'oracle' for r in rows):
    out += ['## Table 2c: defect IoU of anomaly-score methods at the oracle threshold (fitted on test)', '',
            'Not comparable with Table 2: the threshold saw the test masks.', '',
            metric_table(rows, 'defect_iou', variant='oracle'), '']
  out += ['## Table 3: train (labeled images) vs test defect IoU', '']
  out += [table3(rows, mvtec) if has('unet') or has('ae_unet') else '(U-Net and AE + U-Net not run.)', '']
  out += ['## Table 4: ablation (defect IoU, test split)', '',
          '"w/o Data Aug" is the U-Net on the original image with augmentation off; "Data Aug" the U-Net with '
          'augmentation; "Diff" the AE + U-Net fed the difference image only; "Original + Diff" the paper\'s '
          'method.', '']
  out += [table4(rows, mvtec) if has('unet', 'no_aug') or has('ae_unet', 'diff') else
          '(Ablations not run: config.ablations=False.)', '']
  out += ['## Table A1: milliseconds per image', '',
          f'After warm-up (compiled), median of 3 timed runs; "batch 1 / batch N" with N = the eval batch '
          f'({", ".join(map(str, batch_ns)) or "?"}); device: {", ".join(devices) or "?"}. '
          'Textures are timed per stored (2x) image, i.e. all its tiles.', '', table_a1(timing), '']
  out += ['## Table A2: MAE (misclassified pixels per test image)', '',
          metric_table(rows, 'mae_pixels', digits=0), '']
  out += ['## Threshold-free metrics (test split)', '', threshold_free_table(rows), '']
  out += ['## Figure 6', '',
          'Columns: original, AE reconstruction, difference |I − AE(I)| (channel mean, scaled per image), '
          'ground truth, then each method\'s binary prediction at its threshold (first seed).', '']
  for c, path in figures.items():
    out += [f'### {c}', '', f'![Figure 6, {c}]({path})', '']
  if overlay_dir:
    out += [f'Overlays (score heat map, ground truth contour green, prediction contour red) of every test '
            f'image: [{overlay_dir}]({overlay_dir}).', '']
  return '\n'.join(out)


# ----------------------------------------------------------------------------------------------
# Figures.

def _to_png(path: str, image_HxWxC: np.ndarray) -> None:
  from PIL import Image
  buf = _io.BytesIO()
  Image.fromarray(image_HxWxC).save(buf, format='PNG')
  io.write_bytes_atomic(path, buf.getvalue())


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
  _to_png(path, overlay_image(*args, **kwargs))


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
  cols += [(PAPER_NAME.get(m, m).replace('^', ''), p, 'gray') for m, p in predictions.items()]
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
  buf = _io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  plt.close(fig)
  io.write_bytes_atomic(path, buf.getvalue())


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
# The grid of cells.

GRID_KEYS = ('categories', 'methods', 'seeds', 'ablations', 'overlay_category', 'figure_images')
DATASET_CONFIG = {'synthetic_defects': 'configs.synthetic', 'mvtec_ad': 'configs.mvtec', 'folder': 'configs.folder'}
# Run config keys that do not change a cell's result (paths, logging, checkpoint cadence).
_NOT_FINGERPRINTED = ('ae_workdir', 'data.root', 'data.data_dir', 'data.prefetch', 'log_every_steps', 'ckpt')
# Config groups read by some methods only: a change there does not make the other cells stale.
_METHOD_GROUPS = {'pca': ('pca',), 'anogan': ('anogan',), 'consistency': ('pi_model', 'mean_teacher')}


@dataclasses.dataclass(frozen=True)
class Cell:
  dataset: str
  category: str
  seed: int
  method: str
  variant: str = MAIN  # 'main' | 'no_aug' | 'diff'

  @property
  def name(self) -> str:
    return self.method if self.variant == MAIN else f'{self.method}_{self.variant}'

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.category, f'seed{self.seed}', self.name)


def split_list(text: str) -> list[str]:
  return [t.strip() for t in str(text or '').split(',') if t.strip()]


def available_methods(names: list[str]) -> tuple[list[str], list[str]]:
  """(runnable, skipped): names not in the registry (or whose module is missing) are skipped."""
  import importlib.util
  from semiseg.methods import REGISTRY
  unknown = [m for m in names if m not in REGISTRY and m not in common.METHODS]
  if unknown:
    raise ValueError(f'config.methods: unknown method(s) {unknown}; choose from {list(common.METHODS)}.')
  ok, skipped = [], []
  for m in names:
    try:
      found = m in REGISTRY and importlib.util.find_spec(REGISTRY[m]) is not None
    except ImportError:
      found = False
    (ok if found else skipped).append(m)
  return ok, skipped


def resolve_categories(config) -> list[str]:
  cats = split_list(config.categories)
  if cats:
    return cats
  if config.data.name == 'folder':
    from semiseg.data import layout
    if not config.data.root:
      raise ValueError('configs/reproduce.py:folder needs --config.data.root (or --config.categories).')
    return layout.list_categories(config.data.root)
  raise ValueError('config.categories is empty.')


def plan(config) -> tuple[list[Cell], list[str]]:
  """Every cell to run, in an order where each AE comes before the cells that reuse it."""
  requested, skipped = available_methods(split_list(config.methods))
  methods = list(requested)
  if config.ablations:
    for m in ('unet', 'ae_unet'):  # Table 4's 'Data Aug' and 'Original + Diff' columns
      if m not in methods and available_methods([m])[0]:
        methods.append(m)
  if 'ae_unet' in methods and 'ae' not in methods:
    methods.append('ae')  # trained anyway (reused by ae_unet); evaluated too, for Figure 6
  methods = [m for m in common.METHODS if m in methods] + [m for m in methods if m not in common.METHODS]
  methods.sort(key=lambda m: m != 'ae')  # the AE first: ae_unet cells reuse it
  seeds = [int(s) for s in split_list(config.seeds)]
  if not seeds:
    raise ValueError('config.seeds is empty; e.g. --config.seeds=0,1,2.')
  cells = []
  for category in resolve_categories(config):
    for seed in seeds:
      for m in methods:
        cells.append(Cell(config.data.name, category, seed, m))
      if config.ablations:
        if 'unet' in methods:
          cells.append(Cell(config.data.name, category, seed, 'unet', 'no_aug'))
        if 'ae_unet' in methods:
          cells.append(Cell(config.data.name, category, seed, 'ae_unet', 'diff'))
  return cells, skipped


def category_fields(dataset: str, category: str) -> dict[str, Any]:
  """The fields a dataset config sets from the category (texture handling, border, flips)."""
  import importlib
  if dataset == 'folder':
    return {}
  c = importlib.import_module(DATASET_CONFIG[dataset]).get_config(category)
  return {'data.texture': c.data.texture, 'augment.border': c.augment.border,
          'augment.flip_x': c.augment.flip_x, 'augment.flip_y': c.augment.flip_y}


def cell_config(config, cell: Cell, root: str) -> config_dict.ConfigDict:
  """The run config of one cell: the grid keys dropped, category, method, seed and variant set."""
  d = config.to_dict()
  for k in GRID_KEYS:
    d.pop(k, None)
  c = config_dict.ConfigDict(d, type_safe=False)
  c.data.category = cell.category
  for key, value in category_fields(cell.dataset, cell.category).items():
    group, leaf = key.split('.')
    c[group][leaf] = value
  c.method, c.seed = cell.method, cell.seed
  if cell.variant == 'no_aug':
    c.augment.enabled = False
  elif cell.variant == 'diff':
    c.model.unet_input = 'diff'
  elif cell.variant != MAIN:
    raise ValueError(f'unknown variant {cell.variant!r}')
  if cell.method == 'ae_unet':
    c.ae_workdir = Cell(cell.dataset, cell.category, cell.seed, 'ae').workdir(root)
  if cell.method == 'ae':  # exactly the AE that ae_unet expects (ae_num_train_steps, ae_batch_size)
    from semiseg import train
    c = train.ae_config_for(c)
  return c


def fingerprint(config) -> str:
  """A hash of what decides a cell's result (paths, logging and other methods' groups left out)."""
  d = json.loads(config.to_json_best_effort())
  ignored = _NOT_FINGERPRINTED + tuple(g for g, users in _METHOD_GROUPS.items() if config.method not in users)
  for key in ignored:
    node = d
    *parents, leaf = key.split('.')
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def finished_eval(workdir: str, fp: str) -> dict | None:
  """The cell's eval.json when it was written by a finished cell of the same config, else None."""
  path = os.path.join(workdir, 'eval.json')
  try:
    ev = io.read_json(path)
  except (FileNotFoundError, ValueError):
    return None
  return ev if (ev.get('reproduce') or {}).get('fingerprint') == fp else None


# ----------------------------------------------------------------------------------------------
# Running.

@dataclasses.dataclass
class ReproduceResult:
  rows: list[dict]
  timing: list[dict]
  report_path: str
  cells_run: list[str]
  cells_skipped: list[str]  # finished before this run
  cells_failed: list[tuple[str, str]]  # (cell, error): left for a rerun
  skipped_methods: list[str]  # not in the registry


def _is_main() -> bool:
  import jax
  return jax.process_index() == 0


def _save_npz(path: str, **arrays) -> None:
  if not _is_main():
    return
  buf = _io.BytesIO()
  np.savez_compressed(buf, **arrays)
  io.write_bytes_atomic(path, buf.getvalue())


def _category_inputs(root: str, category: str, data, n: int) -> None:
  """Originals and masks of the Figure 6 test images, so the report is rebuilt from files alone."""
  idx = figure_indices(data.test.defect_types, data.test.masks, n)
  _save_npz(os.path.join(root, category, 'figure_inputs.npz'), indices=np.asarray(idx, np.int64),
            images=data.test.images[idx], masks=data.test.masks[idx, ..., 0],
            filenames=np.asarray([data.test.filenames[i] for i in idx]))


def run_cell(cell: Cell, config, root: str, data, mesh, overlay_dir: str | None, progress: bool) -> dict:
  """Trains (or resumes) one cell, evaluates it, writes its figure maps, overlays and eval.json (last)."""
  from semiseg import evaluate, train
  wd = cell.workdir(root)
  result = train.train(config, wd, mesh=mesh, data=data, progress=progress)
  if _is_main() and not os.path.exists(os.path.join(wd, 'split.json')):
    io.write_json_atomic(os.path.join(wd, 'split.json'), data.manifest)
  held: dict[str, np.ndarray] = {}
  ev = evaluate.evaluate(result.method, result.state, result.data, result.ctx, result.mesh, config,
                         workdir=None, score_sink=lambda k, s: held.__setitem__(k, s) if k == 'test' else None)
  scores = held.pop('test')
  inputs = np.load(os.path.join(root, cell.category, 'figure_inputs.npz'))
  idx = inputs['indices']
  maps = {'scores': scores[idx].astype(np.float16), 'threshold': np.float32(ev['threshold'])}
  if result.method.reconstruct is not None and len(idx):
    recon = evaluate.Predictor(result.method, result.state, result.ctx, result.mesh, len(idx),
                               fn=result.method.reconstruct)(data.test.images[idx])
    maps['reconstruction'] = (np.clip(recon, 0, 1) * 255 + 0.5).astype(np.uint8)
  _save_npz(os.path.join(wd, 'figure_maps.npz'), **maps)
  if overlay_dir is not None and _is_main():
    folder = os.path.join(overlay_dir, cell.name)
    vmax = 1.0 if result.method.score_kind == 'probability' else max(
        2.0 * ev['threshold'], float(np.percentile(scores, 99.9)))
    for i, name in enumerate(data.test.filenames):
      save_overlay(os.path.join(folder, flat_name(name) + '.png'), data.test.images[i], scores[i],
                   scores[i] >= ev['threshold'], data.test.masks[i, ..., 0], vmax=vmax)
  del scores, held
  ev['reproduce'] = {'cell': cell.name, 'variant': cell.variant, 'fingerprint': fingerprint(config)}
  if _is_main():  # last: its presence marks the cell finished
    io.write_json_atomic(os.path.join(wd, 'eval.json'), ev)
  return ev


def reproduce(config, workdir: str, progress: bool = True) -> ReproduceResult:
  """Runs every cell of ``config``'s grid not finished yet in ``workdir``, then writes the report."""
  with io.workdir_lock(workdir):
    return _reproduce_locked(config, workdir, progress)


def _reproduce_locked(config, root: str, progress: bool) -> ReproduceResult:
  from semiseg import sharding
  from semiseg.data import pipeline
  cells, skipped_methods = plan(config)
  for m in skipped_methods:
    log.warning('Method %r is not in semiseg.methods.REGISTRY yet: skipped (its columns stay empty).', m)
  categories = list(dict.fromkeys(c.category for c in cells))
  overlay_category = config.overlay_category or categories[0]
  first_seed = min(c.seed for c in cells)
  mesh = sharding.create_mesh()
  run, done, failed = [], [], []
  bar = tqdm(total=len(cells), desc='cells', unit='cell', disable=not progress, dynamic_ncols=True)
  try:
    for category in categories:
      todo = [c for c in cells if c.category == category]
      configs = {c: cell_config(config, c, root) for c in todo}
      pending = [c for c in todo if finished_eval(c.workdir(root), fingerprint(configs[c])) is None]
      done += [c.name for c in todo if c not in pending]
      bar.update(len(todo) - len(pending))
      if not pending and os.path.exists(os.path.join(root, category, 'figure_inputs.npz')):
        continue
      data = pipeline.load_category(configs[todo[0]].data, os.path.join(root, category))
      _category_inputs(root, category, data, int(config.figure_images))
      for cell in pending:
        bar.set_postfix_str(f'{category}/seed{cell.seed}/{cell.name}')
        overlays = (os.path.join(root, 'figures', 'overlays', category)
                    if category == overlay_category and cell.seed == first_seed and cell.variant == MAIN else None)
        where = f'{category}/seed{cell.seed}/{cell.name}'
        try:
          run_cell(cell, configs[cell], root, data, mesh, overlays, progress)
          run.append(where)
        except Exception as e:  # one broken cell (e.g. a non-finite loss) does not stop the grid
          log.exception('Cell %s failed; the others go on. Rerun to retry it.', where)
          failed.append((where, f'{type(e).__name__}: {e}'.splitlines()[0]))
        bar.update(1)
      del data
      gc.collect()
  finally:
    bar.close()
  return write_report(config, root, cells, run, done, failed, skipped_methods, overlay_category)


def collect(config, root: str, cells: list[Cell]) -> tuple[list[dict], list[dict], dict[str, dict]]:
  """(results rows, timing rows, counts per category) from the eval.json files of the cells finished
  with this config (a stale eval.json of another config is left out)."""
  rows, timing, counts = [], [], {}
  for c in cells:
    ev = finished_eval(c.workdir(root), fingerprint(cell_config(config, c, root)))
    if ev is None:
      continue
    rows += rows_from_eval(ev, c.dataset, c.category, c.method, c.variant, c.seed)
    timing.append(timing_from_eval(ev, c.dataset, c.category, c.method, c.variant, c.seed))
    counts.setdefault(c.category, {'unlabeled': ev['num_unlabeled_images'], 'labeled': ev['num_labeled_images'],
                                   'test': ev['num_test_images'] * ev.get('test_tiles_per_image', 1)})
  return rows, timing, counts


def write_figures(root: str, cells: list[Cell]) -> dict[str, str]:
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
      if c.category != category or c.seed != seed or c.variant != MAIN:
        continue
      path = os.path.join(c.workdir(root), 'figure_maps.npz')
      if not os.path.exists(path):
        continue
      maps = np.load(path)
      preds[c.method] = maps['scores'].astype(np.float32) >= float(maps['threshold'])
      if 'reconstruction' in maps and (recon is None or c.method == 'ae'):
        recon = maps['reconstruction']
    order = [m for m in common.METHODS if m in preds] + [m for m in preds if m not in common.METHODS]
    titles = [flat_name(str(f)) for f in inputs['filenames']]
    rel = os.path.join('figures', f'fig6_{category}.png')
    figure6(os.path.join(root, rel), inputs['images'], inputs['masks'], recon, {m: preds[m] for m in order},
            titles)
    out[category] = rel
  return out


def write_report(config, root: str, cells: list[Cell], run: list[str], done: list[str],
                 failed: list[tuple[str, str]], skipped_methods: list[str],
                 overlay_category: str) -> ReproduceResult:
  rows, timing, counts = collect(config, root, cells)
  path = os.path.join(root, 'report.md')
  if not _is_main():
    return ReproduceResult(rows, timing, path, run, done, failed, skipped_methods)
  write_csv(os.path.join(root, 'results.csv'), rows, RESULT_COLUMNS)
  write_csv(os.path.join(root, 'timing.csv'), timing, TIMING_COLUMNS)
  figures = write_figures(root, cells)
  notes = [f'{m}: not in the method registry yet, skipped.' for m in skipped_methods]
  notes += [f'cell {where} failed ({why}); rerun to retry it.' for where, why in failed]
  overlay_rel = os.path.join('figures', 'overlays', overlay_category)
  text = build_markdown(dataset=config.data.name, rows=rows, timing=timing, counts=counts, figures=figures,
                        overlay_dir=overlay_rel if os.path.isdir(os.path.join(root, overlay_rel)) else None,
                        notes=notes)
  io.write_text_atomic(path, text + '\n')
  return ReproduceResult(rows, timing, path, run, done, failed, skipped_methods)
