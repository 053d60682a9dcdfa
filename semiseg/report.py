"""The paper's tables from results rows: results.csv and timing.csv, statistics over seeds, Markdown.

Rows come from the eval.json files of a finished grid (semiseg/reproduce.py); nothing here trains,
evaluates or imports jax, so a report can be rebuilt from files alone.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections import defaultdict
from typing import Iterable

import numpy as np

from semiseg import fileio, paper_results
from semiseg.metrics import METRIC_NAMES, THRESHOLD_FREE
from semiseg.methods import paper_order

# ----------------------------------------------------------------------------------------------
# Result rows and CSV.

KEY_COLUMNS = ('dataset', 'category', 'method', 'variant', 'seed', 'split')
RESULT_COLUMNS = KEY_COLUMNS + METRIC_NAMES + ('ms_per_image',)
TIMING_COLUMNS = ('dataset', 'category', 'method', 'variant', 'seed', 'device', 'ms_batch_1', 'batch_n',
                  'ms_batch_n')
CONVERGENCE_COLUMNS = ('category', 'method', 'seed', 'steps', 'loss_80', 'loss_100', 'change')
MAIN = 'main'
# Table 4's columns: (title, method, variant). 'Data Aug' and 'Original + Diff' are the main cells.
ABLATION_COLUMNS = (('w/o Data Aug (U-Net)', 'unet', 'no_aug'), ('Data Aug (U-Net)', 'unet', MAIN),
                    ('Diff (AE + U-Net)', 'ae_unet', 'diff'), ('Original + Diff (AE + U-Net)', 'ae_unet', MAIN))


def _ms_batch(ms: dict | None) -> tuple[float, int, float]:
  """(ms at batch 1, the eval batch N, ms at batch N) from eval.json's ``ms_per_image``."""
  if not ms:
    return math.nan, 0, math.nan
  n_key = next((k for k in ms if k.startswith('batch_') and k != 'batch_1'), None)
  b1 = number(ms.get('batch_1'))
  bn = number(ms[n_key]) if n_key and ms[n_key] is not None else b1
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
    out.append({**key, 'variant': var, 'split': split, **{m: number(res.get(m)) for m in METRIC_NAMES},
                'ms_per_image': ms})
  return out


# diff_quality.csv: the AE's difference image D against the trivial |I - M| (M: mean unlabeled image) and
# the colour yardstick |W (I - M)| (W whitens the unlabeled images' colour deviations; evaluate.colour_quality).
DIFF_QUALITY_COLUMNS = ('dataset', 'category', 'seed', 'split', 'pixel_auroc', 'pixel_ap', 'aupro',
                        'trivial_auroc', 'trivial_ap', 'colour_auroc', 'colour_ap')


def diff_quality_rows(ev: dict, dataset: str, category: str, seed: int) -> list[dict]:
  """diff_quality.csv rows of an AE cell's eval.json: its test split and its labeled images."""
  out = []
  for split, key in (('test', 'test'), ('labeled', 'train')):
    d, t = ev[key] or {}, (ev.get('trivial') or {}).get(key) or {}  # train: null without labeled images
    c = (ev.get('colour') or {}).get(key) or {}  # absent in eval.json files written before it
    out.append(dict(dataset=dataset, category=category, seed=int(seed), split=split,
                    pixel_auroc=number(d.get('pixel_auroc')), pixel_ap=number(d.get('pixel_ap')),
                    aupro=number(d.get('aupro')), trivial_auroc=number(t.get('pixel_auroc')),
                    trivial_ap=number(t.get('pixel_ap')), colour_auroc=number(c.get('pixel_auroc')),
                    colour_ap=number(c.get('pixel_ap'))))
  return out


def diff_quality_table(rows: list[dict]) -> str:
  """Category x (D, |I - M| and colour-yardstick pixel AUROC, D and |I - M| AP on test, D's AUROC on the
  labeled images), mean ± std."""
  categories = ordered_categories(rows)
  cols = (('test', 'pixel_auroc'), ('test', 'trivial_auroc'), ('test', 'colour_auroc'), ('test', 'pixel_ap'),
          ('test', 'trivial_ap'), ('test', 'aupro'), ('labeled', 'pixel_auroc'), ('labeled', 'trivial_auroc'))

  def cell(category, split, metric):
    vals = [r[metric] for r in rows if r['split'] == split and (category is None or r['category'] == category)]
    if category is None:  # the mean over categories, per seed
      per_seed = defaultdict(list)
      for r in rows:
        if r['split'] == split:
          per_seed[r['seed']].append(r[metric])
      vals = [float(np.mean(v)) for v in per_seed.values() if len(v) == len(categories)]
    return fmt(stat(vals))
  body = [[c] + [cell(c, s, m) for s, m in cols] for c in categories]
  body.append(['**mean**'] + [cell(None, s, m) for s, m in cols])
  return markdown_table(['category', 'D AUROC', '|I − M| AUROC', 'colour AUROC', 'D AP', '|I − M| AP', 'D AUPRO',
                         'D AUROC (labeled)', '|I − M| AUROC (labeled)'], body)


def number(value) -> float:
  """A metric read from JSON: null (undefined, written so by semiseg.fileio.to_json) or absent is NaN."""
  return math.nan if value is None else float(value)


def timing_from_eval(ev: dict, dataset: str, category: str, method: str, variant: str, seed: int) -> dict:
  b1, n, bn = _ms_batch(ev.get('ms_per_image'))
  return dict(dataset=dataset, category=category, method=method, variant=variant, seed=int(seed),
              device=(ev.get('ms_per_image') or {}).get('device', ''), ms_batch_1=b1, batch_n=n, ms_batch_n=bn)


def write_csv(path: str, rows: Iterable[dict], columns: tuple[str, ...]) -> None:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction='ignore', lineterminator='\n')
  w.writeheader()
  for r in rows:
    w.writerow({k: ('' if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
  fileio.write_text_atomic(path, buf.getvalue())


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
  return paper_order(r['method'] for r in rows)


def ordered_categories(rows: list[dict]) -> list[str]:
  seen: dict[str, None] = {}
  for r in rows:
    seen.setdefault(r['category'], None)
  return list(seen)


# ----------------------------------------------------------------------------------------------
# Tables.

def _paper(table: dict, category: str, key) -> str:
  value = table.get(category, {}).get(key)
  return '–' if value is None else f'{value:.3f}'


def metric_table(rows: list[dict], metric: str, *, split: str = 'test', variant: str = MAIN,
                 paper: dict | None = None, digits: int = 3) -> str:
  """Category x method of ``metric`` (mean ± std over seeds) with a mean row; ``paper`` columns
  ({category: {method: value}}, as paper_results.TABLE2_DEFECT_IOU) alongside each method where given."""
  categories, methods = ordered_categories(rows), ordered_methods(rows)
  stats = seed_stats(rows, metric, split=split, variant=variant)
  means = category_mean_stats(rows, metric, categories, split=split, variant=variant)
  methods = [m for m in methods if any((c, m) in stats for c in categories)]
  header = ['category']
  for m in methods:
    header.append(m)
    if paper is not None and m in paper_results.COLUMN_NAMES:
      header.append(f'paper {paper_results.COLUMN_NAMES[m]}')
  body = []
  for c in categories + ['mean']:
    row = [f'**{c}**' if c == 'mean' else c]
    for m in methods:
      row.append(fmt(means.get(m) if c == 'mean' else stats.get((c, m)), digits))
      if paper is not None and m in paper_results.COLUMN_NAMES:
        row.append(_paper(paper, c, m))
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
      p = paper_results.TABLE1_SPLIT.get(c)
      row += [p['unlabeled'], p['labeled'], p['test'], f"{p['percent_labeled']:.2f}"] if p else ['–'] * 4
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
      row += [_paper(paper_results.TABLE3_TRAIN_TEST_IOU, c, k) for k in cols]
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
      row += [_paper(paper_results.TABLE4_ABLATION_IOU, c, (m, v)) for _, m, v in ABLATION_COLUMNS]
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


def convergence_row(records: list[dict]) -> dict | None:
  """How flat a run's logged loss is at its end: the mean logged loss over the steps in (70 %, 80 %] of
  the run ('loss_80') and in (90 %, 100 %] ('loss_100'), and their relative change. Windows, not single
  points: each record is already a mean over its log interval, but a few labeled images still make
  neighbouring records differ."""
  points = [(r['step'], r['loss']) for r in records if r.get('loss') is not None and math.isfinite(r['loss'])]
  if not points:
    return None
  last = points[-1][0]

  def window(lo: float, hi: float) -> float:
    values = [v for s, v in points if lo * last < s <= hi * last]
    return float(np.mean(values)) if values else float('nan')
  at_80, at_100 = window(0.7, 0.8), window(0.9, 1.0)
  return {'steps': last, 'loss_80': at_80, 'loss_100': at_100,
          'change': at_100 / at_80 - 1 if at_80 else float('nan')}


def convergence_table(rows: list[dict]) -> str:
  """Per category and method: 'loss at 80 % -> at 100 % (change)'."""
  categories, methods = ordered_categories(rows), ordered_methods(rows)
  cell = {(r['category'], r['method']): r for r in rows}
  body = []
  for c in categories:
    line = [c]
    for m in methods:
      r = cell.get((c, m))
      line.append('–' if r is None else f"{r['loss_80']:.3g} → {r['loss_100']:.3g} ({100 * r['change']:+.0f} %)")
    body.append(line)
  return markdown_table(['category'] + methods, body)


def threshold_free_table(rows: list[dict]) -> str:
  categories, methods = ordered_categories(rows), ordered_methods(rows)
  stats = {m: seed_stats(rows, m) for m in THRESHOLD_FREE}
  body = [[c, m] + [fmt(stats[k].get((c, m))) for k in THRESHOLD_FREE]
          for c in categories for m in methods if (c, m) in stats[THRESHOLD_FREE[0]]]
  return markdown_table(['category', 'method', 'pixel AUROC', 'AUPRO (FPR ≤ 0.3)', 'pixel AP',
                         'image AUROC', 'F1-max'], body)


def build_markdown(*, dataset: str, rows: list[dict], timing: list[dict], counts: dict[str, dict],
                   figures: dict[str, str], overlay_dir: str | None, notes: list[str],
                   diff_rows: list[dict] | None = None, curves: dict[str, str] | None = None,
                   recon_rows: list[dict] | None = None, convergence: list[dict] | None = None,
                   recipe: str | None = None, commit: str | None = None) -> str:
  """report.md: every table of the paper, our numbers as mean ± sample std (ddof=1) over seeds;
  ``recipe`` (config.recipe) and ``commit`` say what made them."""
  mvtec = dataset == 'mvtec_ad'
  seeds = sorted({r['seed'] for r in rows})
  devices = sorted({t['device'] for t in timing if t['device']})
  batch_ns = sorted({t['batch_n'] for t in timing if t['batch_n']})
  has = lambda m, v=MAIN: any(r['method'] == m and r['variant'] == v for r in rows)
  out = [f'# Reproduction report: {dataset}', '']
  if recipe or commit:
    out += [f'Recipe `{recipe}` (`config.recipe`: `paper` follows the paper\'s text, `semiseg` is the project\'s '
            f'measured recipe); code at commit `{commit or "unknown"}`.', '']
  out += [
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
          '', metric_table(rows, 'defect_iou', paper=paper_results.TABLE2_DEFECT_IOU if mvtec else None), '']
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
          f'After warm-up (compiled), median of 3 timed runs (1 where a run takes over 2 s); "batch 1 / batch N" with N = the eval batch '
          f'({", ".join(map(str, batch_ns)) or "?"}); device: {", ".join(devices) or "?"}. '
          'Textures are timed per stored (2x) image, i.e. all its tiles.', '', table_a1(timing), '']
  out += ['## Table A2: MAE (misclassified pixels per test image)', '',
          metric_table(rows, 'mae_pixels', digits=0), '']
  out += ['## Threshold-free metrics (test split)', '', threshold_free_table(rows), '']
  if diff_rows:
    out += ['## Difference image', '',
            'How well the AE\'s difference image D = |I − AE(I)| (reduced over channels by `config.model.diff_channels`) ranks defect pixels, against '
            'the trivial |I − M| (reduced alike), M the per-pixel mean of the unlabeled images: a D that does not beat it adds '
            'nothing a mean image would not. The colour yardstick |W (I − M)| is each pixel\'s Mahalanobis distance from M, '
            'W whitening the unlabeled images\' colour deviations: how far the defects stand out by colour alone (where normal '
            'colours vary along one direction, as in the embedded textures, it finds every defect that adds a colour). '
            'Pixel AUROC and AP on the test split, AUPRO (FPR ≤ 0.3), and '
            'AUROC on the labeled images (what the gate, `config.model.diff_gate`, compares). Raw numbers: '
            '`diff_quality.csv`.', '', diff_quality_table(diff_rows), '']
  if recon_rows:
    out += ['## Reconstruction error on normal test images', '',
            'Mean |I − reconstruction| (over pixels and channels, unblurred) over the test split\'s good images: how well each '
            'reconstructing method reproduces the category (AnoGAN: its generator after the latent search).', '',
            metric_table(recon_rows, 'recon_error_good', digits=4), '']
  if curves:
    out += ['## Training curves', '',
            'Every method\'s logged training loss against step (each cell\'s `metrics.jsonl`; the AE\'s '
            'labeled-image D AUROC beside it).', '']
    out += [f'- {c}: [{path}]({path})' for c, path in curves.items()] + ['']
  if convergence:
    out += ['### Convergence', '',
            'Mean logged training loss over the steps in (70 %, 80 %] of each run and in (90 %, 100 %], and '
            'the change between them (first seed; a converged run changes by a few % at most). Each logged '
            'loss is already the mean over the steps since the previous log step. AnoGAN\'s loss is the sum '
            'of its two players\'. Raw numbers: `convergence.csv`.', '', convergence_table(convergence), '']
  out += ['## Figure 6', '',
          'Columns: original, AE reconstruction, difference |I − AE(I)| (channel mean, scaled per image), '
          'ground truth, then each method\'s binary prediction at its threshold (first seed).', '']
  for c, path in figures.items():
    out += [f'### {c}', '', f'![Figure 6, {c}]({path})', '']
  if overlay_dir:
    out += [f'Overlays (score heat map, ground truth contour green, prediction contour red) of every test '
            f'image: [{overlay_dir}]({overlay_dir}).', '']
  return '\n'.join(out)
