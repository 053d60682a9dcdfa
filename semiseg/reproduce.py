"""The experiment grid: every (category, method, variant, seed) cell trained and evaluated once, resumable.

A cell's eval.json is written last and carries a fingerprint of the cell's config, so a rerun skips
finished cells and redoes stale ones; then results.csv, timing.csv, report.md (semiseg/report.py) and
figures/ (semiseg/figures.py) are written from the files of the finished cells.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import json
import logging
import os

import importlib.util

import jax
import numpy as np
from ml_collections import config_dict
from tqdm.auto import tqdm

from semiseg import evaluate, figures, fileio, report, restore, sharding, train
from semiseg.data import categories, mvtec_tree, pipeline
from semiseg import methods
from semiseg.report import MAIN

log = logging.getLogger(__name__)

GRID_KEYS = ('categories', 'methods', 'seeds', 'ablations', 'overlay_category', 'figure_images')
# Run config keys that do not change a cell's result (paths, logging, checkpoint cadence; and the
# prerequisites' workdirs, _prerequisite_keys).
_NOT_FINGERPRINTED = ('data.root', 'data.data_dir', 'data.prefetch', 'log_every_steps', 'ckpt')
# Config groups and keys read by some methods only: a change there does not make the other cells stale
# (a U-Net setting does not retrain the AE, PCA or AnoGAN cells of the same grid).
_UNET_FAMILY = ('unet', 'pi_model', 'mean_teacher', 'ae_unet')
_METHOD_GROUPS = {'pca': ('pca',), 'anogan': ('anogan',), 'consistency': ('pi_model', 'mean_teacher'),
                  **{f'model.unet_{k}': _UNET_FAMILY for k in ('features', 'depth', 'prior', 'norm')},
                  'model.unet_input': ('ae_unet',), 'model.diff_dropout': ('ae_unet',),
                  'model.diff_gate': ('ae_unet',)}


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
  unknown = [m for m in names if m not in methods.REGISTRY and m not in methods.METHODS]
  if unknown:
    raise ValueError(f'config.methods: unknown method(s) {unknown}; choose from {list(methods.METHODS)}.')
  ok, skipped = [], []
  for m in names:
    try:
      found = m in methods.REGISTRY and importlib.util.find_spec(methods.REGISTRY[m]) is not None
    except ImportError:
      found = False
    (ok if found else skipped).append(m)
  return ok, skipped


def resolve_categories(config) -> list[str]:
  cats = split_list(config.categories)
  if cats:
    return cats
  if config.data.name == 'folder':
    if not config.data.root:
      raise ValueError('configs/reproduce.py:folder needs --config.data.root (or --config.categories).')
    return mvtec_tree.list_categories(config.data.root)
  raise ValueError('config.categories is empty.')


def _declared(config, method: str) -> dict:
  """{name: Prerequisite} that ``method`` declares, asked with ``config`` as that method's run config."""
  c = config_dict.ConfigDict(config.to_dict(), type_safe=False)
  c.method = method
  return methods.prerequisites(c)


def plan(config) -> tuple[list[Cell], list[str]]:
  """Every cell to run, each prerequisite (ae_unet's AE) before the cells that declare it.

  A prerequisite is a cell of its own: trained once per (category, seed) and reused by every cell
  that declares it, and evaluated too (the AE's Table 2 column and Figure 6's reconstruction).
  """
  requested, skipped = available_methods(split_list(config.methods))
  names = list(requested)
  if config.ablations:
    for m in ('unet', 'ae_unet'):  # Table 4's 'Data Aug' and 'Original + Diff' columns
      if m not in names and available_methods([m])[0]:
        names.append(m)
  needed = {req.config.method for m in names for req in _declared(config, m).values()}
  names = methods.paper_order(names + sorted(needed))
  names.sort(key=lambda m: m not in needed)  # prerequisites first
  seeds = [int(s) for s in split_list(config.seeds)]
  if not seeds:
    raise ValueError('config.seeds is empty; e.g. --config.seeds=0,1,2.')
  cells = []
  for category in resolve_categories(config):
    for seed in seeds:
      for m in names:
        cells.append(Cell(config.data.name, category, seed, m))
      if config.ablations:
        if 'unet' in names:
          cells.append(Cell(config.data.name, category, seed, 'unet', 'no_aug'))
        if 'ae_unet' in names:
          cells.append(Cell(config.data.name, category, seed, 'ae_unet', 'diff'))
  return cells, skipped


def _run_config(config, cell: Cell) -> config_dict.ConfigDict:
  """The grid keys dropped; category (and what follows from it), method, seed and variant of ``cell`` set."""
  d = config.to_dict()
  for k in GRID_KEYS:
    d.pop(k, None)
  c = config_dict.ConfigDict(d, type_safe=False)
  c.data.category = cell.category
  c.method, c.seed = cell.method, cell.seed
  if cell.variant == 'no_aug':
    c.augment.enabled = False
  elif cell.variant == 'diff':
    c.model.unet_input = 'diff'
  elif cell.variant != MAIN:
    raise ValueError(f'unknown variant {cell.variant!r}')
  return categories.apply_category_rules(c)  # texture, border and flips of the cell's category


def cell_config(config, cell: Cell, root: str) -> config_dict.ConfigDict:
  """The run config of one cell. A cell that declares prerequisites points at their cells' workdirs
  (so it restores them, never trains them); the cell of a prerequisite runs exactly the config its
  dependents declare for it (ae: ae_unet's, with ae_num_train_steps)."""
  c = _run_config(config, cell)
  for req in methods.prerequisites(c).values():
    c[req.workdir_key] = dataclasses.replace(cell, method=req.config.method, variant=MAIN).workdir(root)
  if cell.variant == MAIN:
    for dependent in methods.METHODS:
      for req in _declared(c, dependent).values():
        if dependent != cell.method and req.config.method == cell.method:
          return req.config
  return c


def _prerequisite_keys(config) -> tuple[str, ...]:
  """Config keys naming a prerequisite's workdir, of any method: paths, not results."""
  return tuple(sorted({req.workdir_key for m in methods.METHODS for req in _declared(config, m).values()}))


def fingerprint(config) -> str:
  """A hash of what decides a cell's result (paths, logging and other methods' groups left out)."""
  d = json.loads(config.to_json_best_effort())
  other_groups = tuple(g for g, users in _METHOD_GROUPS.items() if config.method not in users)
  ignored = _NOT_FINGERPRINTED + _prerequisite_keys(config) + other_groups
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
    ev = fileio.read_json(path)
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
  return jax.process_index() == 0


def _save_npz(path: str, **arrays) -> None:
  if not _is_main():
    return
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  fileio.write_bytes_atomic(path, buf.getvalue())


def _category_inputs(root: str, category: str, data, n: int) -> None:
  """Originals and masks of the Figure 6 test images, so the report is rebuilt from files alone."""
  idx = figures.figure_indices(data.test.defect_types, data.test.masks, n)
  _save_npz(os.path.join(root, category, 'figure_inputs.npz'), indices=np.asarray(idx, np.int64),
            images=data.test.images[idx], masks=data.test.masks[idx, ..., 0],
            filenames=np.asarray([data.test.filenames[i] for i in idx]))


def run_cell(cell: Cell, config, root: str, data, mesh, overlay_dir: str | None, progress: bool) -> dict:
  """Trains (or resumes) one cell, evaluates it, writes its figure maps, overlays and eval.json (last)."""
  wd = cell.workdir(root)
  result = train.train(config, wd, mesh=mesh, data=data, progress=progress)
  if _is_main() and not os.path.exists(os.path.join(wd, 'split.json')):
    fileio.write_json_atomic(os.path.join(wd, 'split.json'), data.manifest)
  held: dict[str, np.ndarray] = {}
  ev = evaluate.evaluate(result.method, result.state, result.data, result.ctx, result.mesh, config,
                         workdir=None, score_sink=lambda k, s: held.__setitem__(k, s) if k != 'train' else None,
                         extra=restore.training_health(config, wd))
  scores = held.pop('test')
  inputs = np.load(os.path.join(root, cell.category, 'figure_inputs.npz'))
  idx = inputs['indices']
  maps = {'scores': scores[idx].astype(np.float16), 'threshold': np.float32(ev['threshold'])}
  recon = held.pop('test_reconstruction', None)
  if recon is not None:  # the reconstruction the scores came from (AnoGAN: the same search)
    recon = recon[idx]
  elif result.method.reconstruct is not None and len(idx):
    recon = evaluate.Scorer(result.method, result.state, result.ctx, result.mesh, len(idx),
                               fn=result.method.reconstruct)(data.test.images[idx])
  if recon is not None and len(idx):
    maps['reconstruction'] = (np.clip(recon, 0, 1) * 255 + 0.5).astype(np.uint8)
  _save_npz(os.path.join(wd, 'figure_maps.npz'), **maps)
  if overlay_dir is not None and _is_main():
    folder = os.path.join(overlay_dir, cell.name)
    vmax = 1.0 if result.method.score_kind == 'probability' else max(
        2.0 * ev['threshold'], float(np.percentile(scores, 99.9)))
    for i, name in enumerate(data.test.filenames):
      figures.save_overlay(os.path.join(folder, figures.flat_name(name) + '.png'), data.test.images[i], scores[i],
                   scores[i] >= ev['threshold'], data.test.masks[i, ..., 0], vmax=vmax)
  del scores, held
  ev['reproduce'] = {'cell': cell.name, 'variant': cell.variant, 'fingerprint': fingerprint(config)}
  if _is_main():  # last: its presence marks the cell finished
    fileio.write_json_atomic(os.path.join(wd, 'eval.json'), ev)
  return ev


def reproduce(config, workdir: str, progress: bool = True) -> ReproduceResult:
  """Runs every cell of ``config``'s grid not finished yet in ``workdir``, then writes the report."""
  with fileio.workdir_lock(workdir):
    return _reproduce_locked(config, workdir, progress)


def _reproduce_locked(config, root: str, progress: bool) -> ReproduceResult:
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


@dataclasses.dataclass
class Collected:
  """What the report is made of, read back from the finished cells' eval.json files."""
  rows: list[dict]
  timing: list[dict]
  counts: dict[str, dict]
  diff_rows: list[dict]  # diff_quality.csv: cells whose eval has the trivial yardstick (the AE)
  notes: list[str]  # collapsed trainings
  recon_rows: list[dict]  # reconstruction error on normal test images of the reconstructing methods


def cell_notes(c: Cell, ev: dict) -> list[str]:
  """What report.md's notes say of a finished cell: a collapsed training, a D gated off (ae_unet)."""
  notes = []
  if (ev.get('health') or {}).get('collapsed'):
    notes.append(f'{c.category}/seed{c.seed}/{c.name}: training collapsed ('
                 + '; '.join(ev['health']['warnings']) + ').')
  gate = ev.get('diff_gate') or {}
  if gate and not gate.get('open', True):
    notes.append(f'{c.category}/seed{c.seed}/{c.name}: D entered the U-Net as zeros: on the labeled images it '
                 f'ranks defect pixels at AUROC {gate["d_auroc_labeled"]:.3f}, |I − M| at '
                 f'{gate["trivial_auroc_labeled"]:.3f} (config.model.diff_gate={gate["rule"]!r}).')
  return notes


def collect(config, root: str, cells: list[Cell]) -> Collected:
  """Rows, timing, counts per category and D's quality from the eval.json files of the cells finished
  with this config (a stale eval.json of another config is left out)."""
  rows, timing, counts, diff_rows, notes, recon_rows = [], [], {}, [], [], []
  for c in cells:
    ev = finished_eval(c.workdir(root), fingerprint(cell_config(config, c, root)))
    if ev is None:
      continue
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
    titles = [figures.flat_name(str(f)) for f in inputs['filenames']]
    rel = os.path.join('figures', f'fig6_{category}.png')
    figures.figure6(os.path.join(root, rel), inputs['images'], inputs['masks'], recon,
                    {m: preds[m] for m in methods.paper_order(preds)}, titles)
    out[category] = rel
  return out


def write_curves(root: str, cells: list[Cell]) -> tuple[dict[str, str], list[dict]]:
  """figures/curves_<category>.png: every main cell's loss against step (first seed); ({category: path},
  convergence rows of those runs (report.convergence_row))."""
  out, convergence = {}, []
  for category in dict.fromkeys(c.category for c in cells):
    seed = min(c.seed for c in cells if c.category == category)
    runs = {c.method: os.path.join(c.workdir(root), 'metrics.jsonl') for c in cells
            if c.category == category and c.seed == seed and c.variant == MAIN}
    runs = {m: p for m, p in runs.items() if os.path.exists(p)}
    if runs:
      rel = os.path.join('figures', f'curves_{category}.png')
      figures.training_curves(os.path.join(root, rel), {m: runs[m] for m in methods.paper_order(runs)},
                              title=f'{category}, seed {seed}')
      out[category] = rel
    for m in methods.paper_order(runs):
      row = report.convergence_row(figures.read_metrics(runs[m]))
      if row is not None:
        convergence.append({'category': category, 'method': m, 'seed': seed, **row})
  return out, convergence


def write_report(config, root: str, cells: list[Cell], run: list[str], done: list[str],
                 failed: list[tuple[str, str]], skipped_methods: list[str],
                 overlay_category: str) -> ReproduceResult:
  got = collect(config, root, cells)
  rows, timing = got.rows, got.timing
  path = os.path.join(root, 'report.md')
  if not _is_main():
    return ReproduceResult(rows, timing, path, run, done, failed, skipped_methods)
  report.write_csv(os.path.join(root, 'results.csv'), rows, report.RESULT_COLUMNS)
  report.write_csv(os.path.join(root, 'timing.csv'), timing, report.TIMING_COLUMNS)
  if got.diff_rows:
    report.write_csv(os.path.join(root, 'diff_quality.csv'), got.diff_rows, report.DIFF_QUALITY_COLUMNS)
  figure_paths = write_figures(root, cells)
  curve_paths, convergence = write_curves(root, cells)
  if convergence:
    report.write_csv(os.path.join(root, 'convergence.csv'), convergence, report.CONVERGENCE_COLUMNS)
  notes = [f'{m}: not in the method registry yet, skipped.' for m in skipped_methods]
  notes += [f'cell {where} failed ({why}); rerun to retry it.' for where, why in failed]
  notes += got.notes
  overlay_rel = os.path.join('figures', 'overlays', overlay_category)
  text = report.build_markdown(dataset=config.data.name, rows=rows, timing=timing, counts=got.counts,
                               figures=figure_paths, notes=notes, diff_rows=got.diff_rows, curves=curve_paths,
                               recon_rows=got.recon_rows, convergence=convergence,
                               overlay_dir=overlay_rel if os.path.isdir(os.path.join(root, overlay_rel)) else None)
  fileio.write_text_atomic(path, text + '\n')
  return ReproduceResult(rows, timing, path, run, done, failed, skipped_methods)
