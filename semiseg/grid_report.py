"""The grid's report from its finished cells' files: results.csv, timing.csv, diff_quality.csv,
convergence.csv, report.md and figures/. Nothing here trains, evaluates or imports jax: the caller says
which cells are finished (semiseg.grid.finished) and this renders them (tables: semiseg/report.py,
pictures: semiseg/figures.py), so any process can write the report of cells that others ran.
"""

from __future__ import annotations

import dataclasses
import os

from semiseg import figures, fileio, report
from semiseg.report import MAIN


@dataclasses.dataclass
class Collected:
  """What the report is made of, read back from the finished cells' eval.json files."""
  rows: list[dict]
  timing: list[dict]
  counts: dict[str, dict]
  diff_rows: list[dict]  # diff_quality.csv: cells whose eval has the trivial yardstick (the AE)
  notes: list[str]  # collapsed trainings, closed difference gates
  recon_rows: list[dict]  # reconstruction error on normal test images of the reconstructing methods


def cell_notes(c, ev: dict) -> list[str]:
  """What report.md's notes say of a finished cell: a collapsed training, a D gated off (ae_unet)."""
  notes = []
  if (ev.get('health') or {}).get('collapsed'):
    notes.append(f'{c.category}/seed{c.seed}/{c.name}: training collapsed ('
                 + '; '.join(ev['health']['warnings']) + ').')
  gate = ev.get('diff_gate') or {}
  if gate and not gate.get('open', True):
    what = ('|I − M| entered the U-Net in D\'s place' if gate.get('rule') == 'best'  # diff_gate='best'
            else 'D entered the U-Net as zeros')
    ranked = gate.get('ranked', 'labeled')  # 'synthetic' in zero-label mode (data.k_labeled=0)
    notes.append(f'{c.category}/seed{c.seed}/{c.name}: {what}: on the {ranked} images D '
                 f'ranks defect pixels at AUROC {gate["d_auroc_labeled"]:.3f}, |I − M| at '
                 f'{gate["trivial_auroc_labeled"]:.3f} (config.model.diff_gate={gate["rule"]!r}).')
  return notes


def collect(evals: dict) -> Collected:
  """Rows, timing, counts per category and D's quality from {cell: eval.json} (grid order)."""
  rows, timing, counts, diff_rows, notes, recon_rows = [], [], {}, [], [], []
  for c, ev in evals.items():
    if 'trivial' in ev and c.variant == MAIN:
      diff_rows += report.diff_quality_rows(ev, c.dataset, c.category, c.seed)
    if ev.get('recon_error_good') is not None and c.variant == MAIN:
      recon_rows.append(dict(category=c.category, method=c.method, seed=c.seed, variant=MAIN, split='test',
                             recon_error_good=float(ev['recon_error_good'])))
    notes += cell_notes(c, ev)
    rows += report.rows_from_eval(ev, c.dataset, c.category, c.method, c.variant, c.seed)
    timing.append(report.timing_from_eval(ev, c.dataset, c.category, c.method, c.variant, c.seed))
    counts.setdefault(c.category, {'unlabeled': ev['num_unlabeled_images'], 'labeled': ev['num_labeled_images'],
                                   'test': ev['num_test_images'] * ev.get('test_tiles_per_image', 1)})
  return Collected(rows, timing, counts, diff_rows, notes, recon_rows)


def missing_note(cells: list, evals: dict) -> str | None:
  """'k of n cells not finished: washer/seed0 (ae, unet); ...', or None when every cell is."""
  missing: dict[str, list[str]] = {}
  for c in cells:
    if c not in evals:
      missing.setdefault(f'{c.category}/seed{c.seed}', []).append(c.name)
  if not missing:
    return None
  k = sum(map(len, missing.values()))
  return (f'{k} of {len(cells)} cells not finished (their columns are empty or averaged over fewer seeds): '
          + '; '.join(f'{g} ({", ".join(names)})' for g, names in missing.items())
          + '. Run the grid, or the shards that hold them, again to finish them.')


def write_report(root: str, dataset: str, cells: list, evals: dict, notes: list[str],
                 overlay_category: str, recipe: str | None = None, commit: str | None = None) -> Collected:
  """Writes the grid's CSV files, figures and report.md (root/report.md) from ``evals`` ({cell: eval.json}
  of the finished cells of ``cells``); ``notes`` open report.md's notes (skipped methods, failures)."""
  got = collect(evals)
  report.write_csv(os.path.join(root, 'results.csv'), got.rows, report.RESULT_COLUMNS)
  report.write_csv(os.path.join(root, 'timing.csv'), got.timing, report.TIMING_COLUMNS)
  if got.diff_rows:
    report.write_csv(os.path.join(root, 'diff_quality.csv'), got.diff_rows, report.DIFF_QUALITY_COLUMNS)
  figure_paths = figures.write_figures(root, cells)
  curve_paths = figures.write_curves(root, cells)
  convergence = []
  for category, (seed, runs) in figures.curve_runs(root, cells).items():
    for m, path in runs.items():
      row = report.convergence_row(figures.read_metrics(path))
      if row is not None:
        convergence.append({'category': category, 'method': m, 'seed': seed, **row})
  if convergence:
    report.write_csv(os.path.join(root, 'convergence.csv'), convergence, report.CONVERGENCE_COLUMNS)
  missing = missing_note(cells, evals)
  overlay_rel = os.path.join('figures', 'overlays', overlay_category)
  text = report.build_markdown(dataset=dataset, rows=got.rows, timing=got.timing, counts=got.counts,
                               figures=figure_paths, notes=list(notes) + ([missing] if missing else []) + got.notes,
                               diff_rows=got.diff_rows, curves=curve_paths, recon_rows=got.recon_rows,
                               convergence=convergence, recipe=recipe, commit=commit,
                               overlay_dir=overlay_rel if os.path.isdir(os.path.join(root, overlay_rel)) else None)
  fileio.write_text_atomic(os.path.join(root, 'report.md'), text + '\n')
  return got
