"""TensorBoard event files in ``<workdir>/tb/``: the loop's logged scalars (those of metrics.jsonl), and
evaluation's metrics with a few overlays, through tensorboardX (the optional extra ``tb``).

Without tensorboardX, one info line says so (once per process) and nothing else happens. Only process 0
writes (the callers' rule for metrics.jsonl and eval.json). Open with ``tensorboard --logdir runs/``.
"""

from __future__ import annotations

import collections
import logging
import math
import numbers
import os

import numpy as np

from semiseg import figures

log = logging.getLogger(__name__)

TB_DIR = 'tb'
NOT_SCALARS = ('step', 'time')  # metrics.jsonl's keys that are not curves (time is the event's walltime)
MAX_OPEN = 4  # writers kept open (a run's method, its prerequisite, evaluation); the oldest is closed
NUM_OVERLAYS = 4

_writers: collections.OrderedDict = collections.OrderedDict()  # logdir -> SummaryWriter
_missing_logged = False


def _writer(workdir: str):
  """The workdir's SummaryWriter, or None (one info line) without tensorboardX."""
  global _missing_logged
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    if not _missing_logged:
      log.info('tensorboardX is not installed, so no TensorBoard event files are written (metrics.jsonl and '
               "eval.json are); pip install -e '.[tb]' for them.")
      _missing_logged = True
    return None
  logdir = os.path.join(workdir, TB_DIR)
  if logdir not in _writers:
    if len(_writers) >= MAX_OPEN:
      _writers.popitem(last=False)[1].close()
    _writers[logdir] = SummaryWriter(logdir=logdir)
  _writers.move_to_end(logdir)
  return _writers[logdir]


def close_all() -> None:
  while _writers:
    _writers.popitem()[1].close()


def _finite(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def write_scalars(workdir: str, record: dict, prefix: str = '') -> None:
  """A metrics.jsonl record (``step``, ``time`` and its values) as scalars at its step; null and
  non-finite values are left out, as a curve has no point there."""
  writer = _writer(workdir)
  if writer is None:
    return
  for key, value in record.items():
    if key not in NOT_SCALARS and _finite(value):
      writer.add_scalar(prefix + key, float(value), int(record['step']), walltime=record.get('time'))
  writer.flush()


def _numbers(tree: dict, prefix: str) -> dict[str, float]:
  """Nested dicts of metrics flattened to ``prefix/a/b`` -> finite number."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_numbers(value, f'{prefix}/{key}'))
    elif _finite(value):
      out[f'{prefix}/{key}'] = float(value)
  return out


def write_evaluation(workdir: str, result: dict, test, test_scores_NxHxW: np.ndarray, step: int) -> None:
  """evaluate()'s numbers (test, train, threshold, oracle) under ``eval/`` and overlays of up to
  NUM_OVERLAYS defective test images (one per defect type in turn; red: prediction, green: truth)."""
  writer = _writer(workdir)
  if writer is None:
    return
  numbers_ = _numbers({k: result[k] for k in ('test', 'train', 'oracle') if k in result}, 'eval')
  if _finite(result.get('threshold')):
    numbers_['eval/threshold'] = float(result['threshold'])
  for tag, value in numbers_.items():
    writer.add_scalar(tag, value, step)
  threshold = result.get('threshold')
  threshold = float(threshold) if _finite(threshold) else math.inf
  vmax = 1.0 if result.get('score_kind') == 'probability' else (2 * threshold if math.isfinite(threshold) else 1.0)
  masks = test.masks[..., 0].astype(bool)
  for i in figures.figure_indices(test.defect_types, masks, NUM_OVERLAYS):
    overlay = figures.overlay_image(test.images[i], test_scores_NxHxW[i], test_scores_NxHxW[i] >= threshold,
                                    masks[i], vmax=vmax)
    writer.add_image(f'eval/overlay/{figures.flat_name(test.filenames[i])}', overlay, step, dataformats='HWC')
  writer.flush()
