"""Runs the experiment grid (semiseg/grid.py): the cells of one shard, or of all, trained and evaluated
once each, resumable; or N local worker processes, one shard each; then the grid's report.

A cell's eval.json is written last and carries a fingerprint of the cell's config, so a rerun skips
finished cells and redoes stale ones. A run that covers the whole grid (``config.shard`` 0/1) writes
results.csv, timing.csv, report.md and figures/ from the files of the finished cells
(semiseg/grid_report.py) and names the cells still missing; a run of one shard of several writes none.

The layout keys (configs/reproduce.py):
  shard='i/n'  run only the (category, seed) groups that grid.assign_shards gives shard i of n; each
               group is locked while a run holds it, so shards of one workdir run at once.
  workers=1    run in this process (the default); workers=N > 1 starts N processes on this host, each
               one shard on its own device (semiseg/workers.py), waits, then writes the report;
               workers=0 trains nothing: it collects the finished cells and writes the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import io
import json
import logging
import os
import shutil

import jax
import numpy as np
from tqdm.auto import tqdm

from semiseg import evaluate, figures, fileio, grid, grid_report, restore, sharding, train, workers
from semiseg.data import pipeline
from semiseg.grid import MAIN, Cell

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReproduceResult:
  rows: list[dict]  # results.csv rows of the finished cells of the run's scope (the grid, or its shard)
  timing: list[dict]
  report_path: str | None  # None: a shard's run, which writes no report
  cells_run: list[str]
  cells_skipped: list[str]  # finished before this run
  cells_failed: list[tuple[str, str]]  # (cell, error): left for a rerun
  skipped_methods: list[str]  # not in the registry
  cells_missing: list[str] = dataclasses.field(default_factory=list)  # of the scope, not finished after it
  workers_failed: list[str] = dataclasses.field(default_factory=list)  # 'worker i (shard, log): cells'


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


CELL_FILE = 'cell.json'  # in a cell's workdir: the fingerprint its checkpoints were trained for


def recorded_fingerprint(wd: str) -> str | None:
  """The fingerprint a cell's workdir was trained for: its cell.json, else its eval.json's."""
  for name, read in ((CELL_FILE, lambda d: d.get('fingerprint')),
                     ('eval.json', lambda d: (d.get('reproduce') or {}).get('fingerprint'))):
    path = os.path.join(wd, name)
    if os.path.exists(path):
      with open(path) as f:
        return read(json.load(f))
  return None


def start_cell(wd: str, fp: str) -> None:
  """A workdir trained for another config (a stale cell) moves aside to ``<wd>.stale-<its fingerprint>``,
  so the cell trains afresh instead of resuming the other config's checkpoints; then records ``fp``."""
  if not _is_main():
    return
  recorded = recorded_fingerprint(wd)
  if recorded is not None and recorded != fp:
    aside = f'{wd}.stale-{recorded}'
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(wd, aside)
    log.warning('%s was trained for another config: moved to %s; the cell trains afresh.', wd, aside)
  os.makedirs(wd, exist_ok=True)
  fileio.write_json_atomic(os.path.join(wd, CELL_FILE), {'fingerprint': fp})


def run_cell(cell: Cell, config, root: str, data, mesh, overlay_dir: str | None, progress: bool) -> dict:
  """Trains (or resumes) one cell, evaluates it, writes its figure maps, overlays and eval.json (last)."""
  wd = cell.workdir(root)
  start_cell(wd, grid.fingerprint(config))
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
  ev['reproduce'] = {'cell': cell.name, 'variant': cell.variant, 'fingerprint': grid.fingerprint(config)}
  if _is_main():  # last: its presence marks the cell finished
    fileio.write_json_atomic(os.path.join(wd, 'eval.json'), ev)
  return ev


def reproduce(config, workdir: str, progress: bool = True, command: list[str] | None = None) -> ReproduceResult:
  """Runs ``config``'s grid in ``workdir`` as its layout keys say (module docstring). ``command``: how to
  start a worker process (``python -m experiments.reproduce`` and its arguments), for workers > 1."""
  n_workers = int(config.get('workers', 1))
  i, n = grid.parse_shard(config.get('shard', '0/1'))
  if n_workers < 0:
    raise ValueError(f'config.workers={n_workers}: give 1 (this process), N > 1 (N local workers) or 0 '
                     '(collect: write the report of the finished cells, training nothing).')
  if n_workers == 0:
    if n != 1:
      raise ValueError('config.workers=0 collects the whole grid: drop --config.shard.')
    with fileio.workdir_lock(workdir):
      return _report(config, workdir, [], None, [])
  if n_workers > 1:
    if command is None:
      raise ValueError('config.workers > 1 starts worker processes: run python -m experiments.reproduce.')
    return _run_workers(config, workdir, n_workers, i, n, command)
  cells, skipped_methods = grid.plan(config)
  mine = grid.shard_cells(cells, i, n)
  with contextlib.ExitStack() as locks:
    if n == 1:  # the whole grid: no other run on this workdir, as before sharding
      locks.enter_context(fileio.workdir_lock(workdir))
    for key in grid.groups(mine):  # a shard's groups: two shards never run one cell
      locks.enter_context(fileio.workdir_lock(grid.group_dir(workdir, key)))
    run, done, failed = _run_cells(config, workdir, cells, mine, progress)
    if n == 1:
      return _report(config, workdir, run, done, failed, main=_is_main())
  evals = grid.finished(config, workdir, mine)
  got = grid_report.collect(evals)
  missing = [c.where for c in mine if c not in evals]
  log.info('Shard %d/%d: %d cell(s) run, %d finished before, %d not finished. The report is written by a '
           'run of the whole grid: --config.workers=0 collects the finished cells.', i, n, len(run), len(done),
           len(missing))
  return ReproduceResult(got.rows, got.timing, None, run, done, failed, skipped_methods, missing)


@contextlib.contextmanager
def _waiting_lock(path: str):
  """Holds ``path`` (a file lock), waiting for it: one process at a time prepares a category's data."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a+') as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run_cells(config, root: str, cells: list[Cell], mine: list[Cell], progress: bool):
  """Runs the cells of ``mine`` (a shard of ``cells``) not finished yet: (run, done before, failed)."""
  categories = list(dict.fromkeys(c.category for c in cells))
  overlay_category = config.overlay_category or categories[0]  # of the grid: the same in every shard
  first_seed = min(c.seed for c in cells)
  mesh = sharding.create_mesh()
  workers.pin_threads()  # a CPU worker: on its own cores, its thread pool sized as any run's here
  run, done, failed = [], [], []
  bar = tqdm(total=len(mine), desc='cells', unit='cell', disable=not progress, dynamic_ncols=True)
  try:
    for category in dict.fromkeys(c.category for c in mine):
      todo = [c for c in mine if c.category == category]
      configs = {c: grid.cell_config(config, c, root) for c in todo}
      pending = [c for c in todo if grid.finished_eval(c.workdir(root), grid.fingerprint(configs[c])) is None]
      done += [c.where for c in todo if c not in pending]
      bar.update(len(todo) - len(pending))
      if not pending and os.path.exists(os.path.join(root, category, 'figure_inputs.npz')):
        continue
      with _waiting_lock(os.path.join(root, category, '.data.lock')):  # shards holding other seeds of it
        data = pipeline.load_category(configs[todo[0]].data, os.path.join(root, category))
        _category_inputs(root, category, data, int(config.figure_images))
      for cell in pending:
        bar.set_postfix_str(cell.where)
        overlays = (os.path.join(root, 'figures', 'overlays', category)
                    if category == overlay_category and cell.seed == first_seed and cell.variant == MAIN else None)
        try:
          run_cell(cell, configs[cell], root, data, mesh, overlays, progress)
          run.append(cell.where)
        except Exception as e:  # one broken cell (e.g. a non-finite loss) does not stop the grid
          log.exception('Cell %s failed; the others go on. Rerun to retry it.', cell.where)
          failed.append((cell.where, f'{type(e).__name__}: {e}'.splitlines()[0]))
        bar.update(1)
      del data
      gc.collect()
  finally:
    bar.close()
  return run, done, failed


def _report(config, root: str, run: list[str], done: list[str] | None, failed: list[tuple[str, str]],
            workers_failed: list[str] = (), main: bool = True) -> ReproduceResult:
  """The report of the whole grid from its finished cells; names those not finished. ``done`` None:
  every finished cell counts as finished before (a collecting call)."""
  cells, skipped_methods = grid.plan(config)
  for m in skipped_methods:
    log.warning('Method %r is not in semiseg.methods.REGISTRY yet: skipped (its columns stay empty).', m)
  evals = grid.finished(config, root, cells)
  missing = [c.where for c in cells if c not in evals]
  path = os.path.join(root, 'report.md')
  notes = [f'{m}: not in the method registry yet, skipped.' for m in skipped_methods]
  notes += [f'cell {where} failed ({why}); rerun to retry it.' for where, why in failed]
  notes += [f'{w}; rerun to resume them.' for w in workers_failed]
  if main:
    categories = list(dict.fromkeys(c.category for c in cells))
    got = grid_report.write_report(root, config.data.name, cells, evals, notes,
                                   config.overlay_category or categories[0], recipe=config.recipe,
                                   commit=fileio.git_commit())
  else:
    got = grid_report.collect(evals)
  if missing:
    log.warning('%d of %d cells not finished: %s', len(missing), len(cells), ', '.join(missing))
  if done is None:
    done = [c.where for c in evals]
  return ReproduceResult(got.rows, got.timing, path, run, done, failed, skipped_methods, missing,
                         list(workers_failed))


def _run_workers(config, root: str, n_workers: int, i: int, n: int, command: list[str]) -> ReproduceResult:
  """Shards i*N .. i*N+N-1 of n*N (shard i/n split N ways) in N local processes; then, for the whole
  grid (n = 1), the report. A worker that fails leaves its cells unfinished: named with its log."""
  cells, skipped_methods = grid.plan(config)
  n_groups = len(grid.groups(cells))
  if n == 1 and n_workers > n_groups:  # (with n > 1 every host must split alike: a worker may get none)
    log.warning('config.workers=%d but the grid has %d (category, seed) groups: %d workers.', n_workers,
                n_groups, n_groups)
    n_workers = n_groups
  with contextlib.ExitStack() as locks:
    if n == 1:
      locks.enter_context(fileio.workdir_lock(root))
    platform, num_devices = workers.probe_platform()
    plan = workers.plan_workers(n_workers, platform, num_devices, os.path.join(root, 'workers'),
                                shard_offset=i * n_workers, num_shards=n * n_workers)
    for w in plan:
      log.info('Worker %d: shard %s, %s%s, log %s', w.index, w.shard, platform,
               f' cores {list(w.cores)}' if w.cores else '', w.log_path)
    before = set(grid.finished(config, root, cells))
    codes = workers.run_workers(plan, command)
    after = grid.finished(config, root, cells)
    failed_workers = []
    for w in plan:
      if codes[w.index] != 0:
        left = [c.where for c in grid.shard_cells(cells, *grid.parse_shard(w.shard)) if c not in after]
        failed_workers.append(f'worker {w.index} (shard {w.shard}) exited with code {codes[w.index]}, log '
                              f'{w.log_path}; its unfinished cells: {", ".join(left) or "none"}')
        log.error('%s', failed_workers[-1])
    run = [c.where for c in cells if c in after and c not in before]
    done = [c.where for c in cells if c in before]
    if n == 1:
      return _report(config, root, run, done, [], failed_workers)
  mine = grid.shard_cells(cells, i, n)
  got = grid_report.collect({c: ev for c, ev in after.items() if c in set(mine)})
  return ReproduceResult(got.rows, got.timing, None, run, done, [], skipped_methods,
                         [c.where for c in mine if c not in after], failed_workers)
