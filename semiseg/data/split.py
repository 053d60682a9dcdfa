"""The paper's split (4.1): unlabeled = train/good; labeled = k images per defect type from test; test = the rest.

The split is written once as ``<workdir>/split.json`` so every method, every rerun and every
evaluation sees the same images.
"""

from __future__ import annotations

import json
import os

import numpy as np

from semiseg import io

GOOD = 'good'
MANIFEST = 'split.json'


def make_split(test_defect_types: list[str], test_filenames: list[str], train_filenames: list[str],
               k: int, seed: int, *, dataset: str = '', category: str = '') -> dict:
  """The split manifest; ``k`` labeled images per defect type (not 'good'), chosen with ``seed``."""
  if len(test_defect_types) != len(test_filenames):
    raise ValueError('make_split: test_defect_types and test_filenames differ in length.')
  if k < 1:
    raise ValueError(f'data.k_labeled must be >= 1 (got {k}).')
  by_type: dict[str, list[str]] = {}
  for t, f in zip(test_defect_types, test_filenames):
    by_type.setdefault(t, []).append(f)
  labeled = []
  for t in sorted(by_type):
    if t == GOOD:
      continue
    files = sorted(by_type[t])
    if len(files) < k + 1:
      raise ValueError(f'{dataset}/{category}: defect type {t!r} has {len(files)} test image(s); '
                       f'k_labeled={k} needs at least {k + 1} (k to label, one to test). '
                       'Lower data.k_labeled or add images of that type.')
    # One generator per type, keyed by its name, so adding a type does not move the others.
    rng = np.random.default_rng([seed, *t.encode()])
    labeled += [files[i] for i in sorted(rng.choice(len(files), size=k, replace=False))]
  if not labeled:
    raise ValueError(f'{dataset}/{category}: the test split has no defect images, so there is '
                     'nothing to label; add test/<defect_type>/ folders with masks.')
  chosen = set(labeled)
  return {'dataset': dataset, 'category': category, 'k': k, 'seed': seed,
          'unlabeled': sorted(train_filenames),
          'labeled': labeled,
          'test': sorted(f for f in test_filenames if f not in chosen)}


def load_or_create_manifest(workdir: str | None, test_defect_types: list[str],
                            test_filenames: list[str], train_filenames: list[str], k: int,
                            seed: int, *, dataset: str = '', category: str = '') -> dict:
  """Reads ``workdir/split.json`` if present (checking it matches), else makes and writes it."""
  fresh = make_split(test_defect_types, test_filenames, train_filenames, k, seed,
                     dataset=dataset, category=category)
  if workdir is None:
    return fresh
  path = os.path.join(workdir, MANIFEST)
  if os.path.exists(path):
    with open(path) as f:
      manifest = json.load(f)
    for key in ('dataset', 'category', 'k', 'seed'):
      if manifest.get(key) != fresh[key]:
        raise ValueError(f'{path}: the saved split has {key}={manifest.get(key)!r} but this run asks '
                         f'for {fresh[key]!r}. Use another workdir, or delete {path} to re-split '
                         '(results from the old split then no longer compare).')
    known = set(fresh['unlabeled']) | set(fresh['labeled']) | set(fresh['test'])
    missing = [f for part in ('unlabeled', 'labeled', 'test') for f in manifest[part]
               if f not in known]
    if missing:
      raise ValueError(f'{path}: {len(missing)} file(s) of the saved split are not in the dataset '
                       f'(e.g. {missing[0]!r}); the data changed. Use another workdir or delete it.')
    return manifest
  io.write_json_atomic(path, fresh)  # a concurrent reader sees no file or the whole one
  return fresh
