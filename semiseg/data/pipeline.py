"""Loads a category into memory as unlabeled / labeled / test splits and streams numpy batches.

One category is held in host memory as uint8 (the largest, a 512x512 texture category of ~300
images, is ~250 MB); this keeps reading random-access and the batch order a pure function of
(seed, step). Batches are numpy; the trainer turns them into global ``jax.Array``s.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
from typing import Any
from collections.abc import Iterator

import numpy as np

from semiseg.data import categories, mvtec_tree, split as split_lib, tfds_common

DATASETS = ('synthetic_defects', 'mvtec_ad', 'folder')


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The typed form of ``config.data`` (see configs/common.py); ``texture`` follows from the category."""
  name: str
  category: str
  root: str | None
  data_dir: str | None
  image_size: int
  texture: bool
  k_labeled: int
  test_to_unlabeled: int
  split_seed: int
  prefetch: int

  @classmethod
  def from_config(cls, data_config) -> DataSpec:
    d = dict(data_config)
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [f for f in fields if f not in d]
    if missing:
      raise ValueError(f'config.data lacks {missing}; start from configs.common.get_base_config().')
    if d['name'] not in DATASETS:
      raise ValueError(f'config.data.name={d["name"]!r} is not a dataset; valid: {DATASETS}.')
    return cls(**{**{f: d[f] for f in fields}, 'texture': categories.texture(data_config)})

  @property
  def stored_size(self) -> int:
    """Side of the images in memory: textures are kept at 2x the network input (paper 3.3)."""
    return 2 * self.image_size if self.texture else self.image_size


@dataclasses.dataclass
class Split:
  images: np.ndarray  # uint8 [N, S, S, 3]; S = image_size for objects, 2*image_size for textures
  masks: np.ndarray  # uint8 [N, S, S, 1], 0/1
  defect_types: list[str]
  filenames: list[str]
  # More per-image arrays ([N, ...]) that batches carry under their names, e.g. what a method computes
  # once from the stored images instead of at every step (base.Method.stream_fields).
  fields: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.filenames)


@dataclasses.dataclass
class CategoryData:
  unlabeled: Split
  labeled: Split
  test: Split
  manifest: dict
  texture: bool
  image_size: int  # the network input side (config.data.image_size)


Example = tuple[np.ndarray, np.ndarray, str]  # image, mask, defect_type


def _read_folder(spec: DataSpec) -> dict[str, Example]:
  if not spec.root:
    raise ValueError('config.data.name="folder" needs config.data.root: the folder holding '
                     '<category>/train/good, <category>/test and <category>/ground_truth.')
  records = mvtec_tree.read_tree(spec.root, spec.category)
  out = {}
  for r in records:
    image, mask = mvtec_tree.load_record(r, spec.stored_size)
    out[r.filename] = (image, mask, r.defect_type)
  return out


def create_builder(spec: DataSpec):
  """The TFDS builder of ``spec`` (synthetic at the stored size; MVTec at the paper's sizes)."""
  data_dir = spec.data_dir or os.environ.get('SEMISEG_DATA_DIR') or None
  if spec.name == 'synthetic_defects':
    from semiseg.data import tfds_synthetic_defects  # pylint: disable=g-import-not-at-top
    return tfds_synthetic_defects.SyntheticDefects(
        config=tfds_synthetic_defects.config_for(spec.category, spec.stored_size), data_dir=data_dir)
  from semiseg.data import tfds_mvtec_ad  # pylint: disable=g-import-not-at-top
  return tfds_mvtec_ad.MvtecAd(config=tfds_mvtec_ad.config_for(spec.category), data_dir=data_dir)


def _read_tfds(spec: DataSpec) -> dict[str, Example]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = create_builder(spec)
  download_config = None
  if spec.name == 'mvtec_ad':
    if not spec.root:
      raise ValueError('config.data.name="mvtec_ad" needs config.data.root: the folder holding '
                       'mvtec_anomaly_detection.tar.xz or its extracted tree (see '
                       'semiseg/data/tfds_mvtec_ad.py for the download).')
    download_config = tfds.download.DownloadConfig(manual_dir=spec.root)
  builder.download_and_prepare(file_format='array_record', download_config=download_config)
  out = {}
  for source in builder.as_data_source().values():
    for i in range(len(source)):
      ex = source[i]
      image = mvtec_tree.resize_image(ex['image'], spec.stored_size)
      mask = mvtec_tree.resize_mask(ex['mask'], spec.stored_size)
      out[tfds_common.decode_str(ex['filename'])] = (image, mask,
                                                     tfds_common.decode_str(ex['defect_type']))
  return out


def _make_split(examples: dict[str, Example], filenames: list[str], size: int) -> Split:
  if not filenames:
    return Split(np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size, 1), np.uint8),
                 [], [])
  return Split(images=np.stack([examples[f][0] for f in filenames]),
               masks=np.stack([examples[f][1] for f in filenames]),
               defect_types=[examples[f][2] for f in filenames], filenames=list(filenames))


def load_category(data_config, workdir: str | None) -> CategoryData:
  """Reads ``config.data``'s category and splits it (manifest reused from ``workdir`` if there)."""
  spec = DataSpec.from_config(data_config)
  examples = _read_folder(spec) if spec.name == 'folder' else _read_tfds(spec)
  train = sorted(f for f in examples if f.startswith('train/'))
  test = sorted(f for f in examples if not f.startswith('train/'))
  where = f'{spec.name}/{spec.category}'
  if not train:
    raise ValueError(f'{where}: no unlabeled (train/good) images; add some to the category.')
  manifest = split_lib.load_or_create_manifest(
      workdir, [examples[f][2] for f in test], test, train, spec.k_labeled, spec.split_seed,
      test_to_unlabeled=spec.test_to_unlabeled,
      test_tiles=(spec.stored_size // spec.image_size) ** 2, dataset=spec.name, category=spec.category)
  s = spec.stored_size
  unlabeled = _make_split(examples, manifest['unlabeled'], s)
  unlabeled.masks[:] = 0  # unlabeled: the defect images moved there by the paper's rule lose their masks
  data = CategoryData(unlabeled=unlabeled,
                      labeled=_make_split(examples, manifest['labeled'], s),
                      test=_make_split(examples, manifest['test'], s),
                      manifest=manifest, texture=spec.texture, image_size=spec.image_size)
  for part in ('unlabeled', 'labeled') if spec.k_labeled else ('unlabeled',):  # k_labeled=0: none labeled
    if not len(getattr(data, part)):
      raise ValueError(f'{where}: the {part} split is empty; check config.data.category and '
                       'data.k_labeled, and that the category has train/good and defect images.')
  return data


def global_indices(n: int, *, batch_size: int, seed: int, step: int, sampling: str) -> np.ndarray:
  """Rows of the global batch at ``step``: a pure function of (n, batch_size, seed, step, sampling).

  'epoch': one permutation per epoch from ``default_rng([seed, 0, epoch])``; with n >= batch_size
  the remainder of each epoch is dropped (epoch = step // (n // batch_size)); with n < batch_size
  the permutations are concatenated, so a batch may span epochs (epoch = position // n).
  'replacement': ``batch_size`` uniform draws from ``default_rng([seed, 1, step])``.
  """
  if n <= 0:
    raise ValueError('batch_stream: the split is empty.')
  if sampling == 'replacement':
    return np.random.default_rng([seed, 1, step]).integers(0, n, batch_size)
  if sampling != 'epoch':
    raise ValueError(f"batch_stream: sampling={sampling!r}; use 'epoch' or 'replacement'.")
  perm = lambda e: np.random.default_rng([seed, 0, e]).permutation(n)
  if n >= batch_size:
    per_epoch = n // batch_size
    epoch, offset = divmod(step, per_epoch)
    return perm(epoch)[offset * batch_size:(offset + 1) * batch_size]
  positions = step * batch_size + np.arange(batch_size)
  epochs, within = np.divmod(positions, n)
  perms = {e: perm(e) for e in np.unique(epochs)}
  return np.array([perms[e][i] for e, i in zip(epochs, within)])


def _local_batch(split: Split, rows: np.ndarray) -> dict[str, np.ndarray]:
  order = np.argsort(rows, kind='stable')  # gather in sorted order: faster on a large array
  image = np.empty((len(rows),) + split.images.shape[1:], np.uint8)
  mask = np.empty((len(rows),) + split.masks.shape[1:], np.uint8)
  image[order] = split.images[rows[order]]
  mask[order] = split.masks[rows[order]]
  return {'image': image, 'mask': mask, **{name: values[rows] for name, values in split.fields.items()}}


def batch_stream(split: Split, *, batch_size: int, seed: int, start_step: int = 0,
                 sampling: str = 'epoch', process_index: int = 0, process_count: int = 1,
                 prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Process-local rows of the global batch of steps start_step, start_step + 1, ... (endless).

  Yields ``{'image': uint8 [batch_size / process_count, S, S, 3], 'mask': uint8 [..., S, S, 1]}``, and
  the same rows of each of ``split.fields`` under its name.
  The global batch of a step depends only on (seed, step, sampling, len(split)), so a resumed run
  sees the data an uninterrupted one would. ``prefetch`` batches are prepared by a daemon thread.
  """
  if batch_size % process_count:
    raise ValueError(f'batch_stream: batch_size={batch_size} does not divide by process_count='
                     f'{process_count}; make the global batch a multiple of the host count.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'batch_stream: process_index={process_index} not in [0, {process_count}).')
  n, local = len(split), batch_size // process_count
  global_indices(n, batch_size=batch_size, seed=seed, step=start_step, sampling=sampling)  # check

  def make(step: int) -> dict[str, np.ndarray]:
    rows = global_indices(n, batch_size=batch_size, seed=seed, step=step, sampling=sampling)
    return _local_batch(split, rows[process_index * local:(process_index + 1) * local])

  # Not a generator itself, so that the checks above raise at the call, not at the first next().
  if prefetch <= 0:
    return (make(step) for step in itertools.count(start_step))
  return _prefetched(make, start_step, prefetch)


def prefetched(make, start_step: int, prefetch: int) -> Iterator[Any]:
  """``make(step)`` for step = start_step, start_step + 1, ... (endless); ``prefetch`` > 0: prepared that many
  ahead by a daemon thread, in order (``make`` may keep state: one thread calls it, step after step)."""
  if prefetch <= 0:
    return (make(step) for step in itertools.count(start_step))
  return _prefetched(make, start_step, prefetch)


def _prefetched(make, start_step: int, prefetch: int) -> Iterator[Any]:
  """``make(start_step), make(start_step + 1), ...`` computed ``prefetch`` ahead by a daemon thread, in order;
  an exception in ``make`` is raised at the consumer's ``next``."""
  q: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()

  def produce() -> None:
    step = start_step
    while not stop.is_set():
      try:
        item = (True, make(step))
      except BaseException as e:  # handed to the consumer, raised there
        item = (False, e)
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          break
        except queue.Full:
          pass
      if not item[0]:
        return
      step += 1

  thread = threading.Thread(target=produce, name='semiseg-batch-prefetch', daemon=True)
  thread.start()
  try:
    while True:
      ok, value = q.get()
      if not ok:
        raise value
      yield value
  finally:  # generator closed or garbage-collected: stop the producer and let it exit
    stop.set()
    thread.join(timeout=1.0)
