"""The experiment grid as data: its cells, their run configs and fingerprints, and its shards.

Nothing here trains or touches a device: a cell is planned, configured, fingerprinted and assigned to a
shard from the config alone, so every process of a sharded run (a local worker, a SLURM array task, a
TPU host) computes the same grid and the same shards (semiseg/reproduce.py runs them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import re

from ml_collections import config_dict

from semiseg import fileio, methods
from semiseg.data import categories, mvtec_tree

MAIN = 'main'
# Keys of configs/reproduce.py that describe the grid or its layout, not a cell: dropped from every cell's
# run config, so a cell's fingerprint (and result) does not depend on which shard or worker ran it.
GRID_KEYS = ('categories', 'methods', 'seeds', 'ablations', 'overlay_category', 'figure_images', 'shard',
             'workers')
# Run config keys that do not change a cell's result (paths, logging, checkpoint cadence; and the
# prerequisites' workdirs, _prerequisite_keys).
_NOT_FINGERPRINTED = ('data.root', 'data.data_dir', 'data.prefetch', 'log_every_steps', 'ckpt')


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

  @property
  def where(self) -> str:
    return f'{self.category}/seed{self.seed}/{self.name}'

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


def method_config_keys() -> dict[str, tuple[str, ...]]:
  """{method: the config groups and keys only it reads} (each method module's CONFIG_KEYS, which its
  Method carries as ``config_keys``)."""
  return {m: tuple(getattr(importlib.import_module(path), 'CONFIG_KEYS', ()))
          for m, path in methods.REGISTRY.items()}


def fingerprint(config) -> str:
  """A hash of what decides a cell's result: paths, logging and the keys that only other methods read
  (Method.config_keys) left out. A key no method declares is read by every method."""
  d = json.loads(config.to_json_best_effort())
  declared = method_config_keys()
  others = {k for m, keys in declared.items() if m != config.method for k in keys}
  other_groups = tuple(sorted(others - set(declared.get(config.method, ()))))
  for key in _NOT_FINGERPRINTED + _prerequisite_keys(config) + other_groups:
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


def finished(config, root: str, cells: list[Cell]) -> dict[Cell, dict]:
  """{cell: its eval.json} of the cells of ``cells`` finished with this config."""
  out = {}
  for c in cells:
    ev = finished_eval(c.workdir(root), fingerprint(cell_config(config, c, root)))
    if ev is not None:
      out[c] = ev
  return out


# ----------------------------------------------------------------------------------------------
# Shards: groups of cells that share a (category, seed), so an AE stays with the cells that use it.

def parse_shard(text: str) -> tuple[int, int]:
  """'i/n' -> (i, n), 0 <= i < n."""
  m = re.fullmatch(r'\s*(\d+)\s*/\s*(\d+)\s*', str(text))
  if not m or not int(m.group(1)) < int(m.group(2)):
    raise ValueError(f'config.shard={text!r}: give i/n with 0 <= i < n, e.g. --config.shard=0/4 '
                     '(under SLURM: --config.shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT).')
  return int(m.group(1)), int(m.group(2))


def group_key(cell: Cell) -> tuple[str, int]:
  return cell.category, cell.seed


def group_dir(root: str, key: tuple[str, int]) -> str:
  """The folder of a (category, seed) group's cells; its .lock marks the shard running it."""
  return os.path.join(root, key[0], f'seed{key[1]}')


def groups(cells: list[Cell]) -> dict[tuple[str, int], list[Cell]]:
  """{(category, seed): its cells}, in the grid's order."""
  out: dict[tuple[str, int], list[Cell]] = {}
  for c in cells:
    out.setdefault(group_key(c), []).append(c)
  return out


def assign_shards(cells: list[Cell], n: int) -> dict[tuple[str, int], int]:
  """{(category, seed): shard} for ``n`` shards, a pure function of the grid: groups by estimated cost
  (their number of cells), largest first, each to the shard with the least cost so far (ties: the
  lower shard; equal groups keep the grid's order, so one category's seeds spread over shards)."""
  by_group = groups(cells)
  load, out = [0] * n, {}
  for key in sorted(by_group, key=lambda k: -len(by_group[k])):  # stable: equal groups keep their order
    shard = min(range(n), key=lambda s: (load[s], s))
    out[key] = shard
    load[shard] += len(by_group[key])
  return out


def shard_cells(cells: list[Cell], i: int, n: int) -> list[Cell]:
  """The cells of shard ``i`` of ``n``, in the grid's order."""
  if n == 1:
    return list(cells)
  assignment = assign_shards(cells, n)
  return [c for c in cells if assignment[group_key(c)] == i]
