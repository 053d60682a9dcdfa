"""The paper's split (4.1, Table 1); written once as ``split.json``.

It follows Table 1 of the paper exactly, for all 15 MVTec AD categories:
for every test folder, ``good`` included, ``k`` images are labeled and ``to_unlabeled`` more move
into the unlabeled set (beside ``train/good``); the rest stay test. So the unlabeled set is "mostly
normal" with a few defect images (without their masks), and a labeled good image trains with its
all-normal mask. Bottle: 209 + 4 x 2 = 217 unlabeled, 4 labeled, 83 - 12 = 71 test.

Choices are seeded per folder by its name, so adding a folder does not move the others' choices.
The manifest is written once as ``<workdir>/split.json`` so every method, rerun and evaluation sees
the same images.
"""

from __future__ import annotations

import json
import os

import numpy as np

from semiseg import fileio

GOOD = 'good'
MANIFEST = 'split.json'
RULE = 'paper'  # recorded in the manifest: one written by an older rule is not reused
# What the saved manifest must share with a fresh one to be reused.
_IDENTITY = ('dataset', 'category', 'rule', 'k', 'test_to_unlabeled', 'seed')


def _by_folder(test_defect_types: list[str], test_filenames: list[str]) -> dict[str, list[str]]:
  if len(test_defect_types) != len(test_filenames):
    raise ValueError('make_split: test_defect_types and test_filenames differ in length.')
  by_type: dict[str, list[str]] = {}
  for t, f in zip(test_defect_types, test_filenames):
    by_type.setdefault(t, []).append(f)
  return {t: sorted(files) for t, files in sorted(by_type.items())}


def make_split(test_defect_types: list[str], test_filenames: list[str], train_filenames: list[str],
               k: int, seed: int, *, test_to_unlabeled: int = 2, dataset: str = '',
               category: str = '') -> dict:
  """The split manifest: keys ``unlabeled``, ``labeled``, ``test`` (file lists) and the rule's settings.

  Args:
    test_defect_types, test_filenames: the test images and their folder (``good`` or a defect type).
    train_filenames: ``train/good`` images; always unlabeled.
    k: labeled images per folder (``config.data.k_labeled``); 0 labels none (zero-label mode: the U-Net
      methods then train on synthetic defects alone, config.synth).
    seed: ``config.data.split_seed``.
    test_to_unlabeled: images per folder moved into the unlabeled set.
  """
  if k < 0:
    raise ValueError(f'config.data.k_labeled must be >= 0, got {k}.')
  moved = int(test_to_unlabeled)
  if moved < 0:
    raise ValueError(f'config.data.test_to_unlabeled must be >= 0, got {test_to_unlabeled}.')
  folders = _by_folder(test_defect_types, test_filenames)
  labeled, to_unlabeled = [], []
  for t, files in folders.items():
    need = k + moved + 1
    if len(files) < need:
      raise ValueError(f'{dataset}/{category}: test folder {t!r} has {len(files)} image(s); '
                       f'k_labeled={k}' + (f' and test_to_unlabeled={moved}' if moved else '')
                       + f' needs at least {need} ({k} to label, ' + (f'{moved} for the unlabeled set, ' if moved else '')
                       + 'one to test). Lower config.data.k_labeled' + (' or config.data.test_to_unlabeled' if moved else '')
                       + ', or add images to that folder.')
    # One generator per folder, keyed by its name, so adding a folder does not move the others.
    rng = np.random.default_rng([seed, *t.encode()])
    chosen = rng.choice(len(files), size=k + moved, replace=False)
    labeled += [files[i] for i in sorted(chosen[:k])]
    to_unlabeled += [files[i] for i in sorted(chosen[k:])]
  if not any(t != GOOD for t in folders):
    raise ValueError(f'{dataset}/{category}: the test split has no defect images, so there is '
                     'nothing to label; add test/<defect_type>/ folders with masks.')
  taken = set(labeled) | set(to_unlabeled)
  return {'dataset': dataset, 'category': category, 'rule': RULE, 'k': k, 'test_to_unlabeled': moved,
          'seed': seed,
          'unlabeled': sorted(train_filenames) + to_unlabeled,
          'labeled': labeled,
          'test': sorted(f for f in test_filenames if f not in taken)}


def counts(manifest: dict, test_tiles: int = 1) -> dict[str, int]:
  """Table 1's numbers of a manifest; ``test_tiles`` counts each test image as that many (textures: 4)."""
  return {'unlabeled': len(manifest['unlabeled']), 'labeled': len(manifest['labeled']),
          'test': len(manifest['test']) * test_tiles}


def load_or_create_manifest(workdir: str | None, test_defect_types: list[str],
                            test_filenames: list[str], train_filenames: list[str], k: int,
                            seed: int, *, test_to_unlabeled: int = 2,
                            test_tiles: int = 1, dataset: str = '', category: str = '') -> dict:
  """Reads ``workdir/split.json`` if present (checking it matches), else makes and writes it.

  The manifest also records ``counts`` (Table 1's numbers; ``test`` counts each test image as
  ``test_tiles`` tiles, 4 for textures as in the paper, ``test_images`` the images).
  """
  fresh = make_split(test_defect_types, test_filenames, train_filenames, k, seed,
                     test_to_unlabeled=test_to_unlabeled, dataset=dataset, category=category)
  fresh['counts'] = {**counts(fresh, test_tiles), 'test_images': len(fresh['test'])}
  if workdir is None:
    return fresh
  path = os.path.join(workdir, MANIFEST)
  if os.path.exists(path):
    with open(path) as f:
      manifest = json.load(f)
    # A manifest written before the rule was recorded was made by the per-defect-type rule.
    saved = {'rule': 'k_per_defect', 'test_to_unlabeled': 0, **manifest}
    for key in _IDENTITY:
      if saved.get(key) != fresh[key]:
        raise ValueError(f'{path}: the saved split has {key}={saved.get(key)!r} but this run asks '
                         f'for {fresh[key]!r}. Use another workdir, or delete {path} to re-split '
                         '(results from the old split then no longer compare).')
    known = set(fresh['unlabeled']) | set(fresh['labeled']) | set(fresh['test'])
    missing = [f for part in ('unlabeled', 'labeled', 'test') for f in manifest[part]
               if f not in known]
    if missing:
      raise ValueError(f'{path}: {len(missing)} file(s) of the saved split are not in the dataset '
                       f'(e.g. {missing[0]!r}); the data changed. Use another workdir or delete it.')
    return saved
  fileio.write_json_atomic(path, fresh)  # a concurrent reader sees no file or the whole one
  return fresh
