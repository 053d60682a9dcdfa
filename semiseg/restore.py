"""A run's parts from its config (checks, schedule, data, method), and a finished method back from its workdir.

Nothing here trains. The loop (semiseg/train.py) builds its runs with ``build`` and trains what is
missing; evaluation and prediction restore with ``restore_trained`` alone, so a missing checkpoint,
the method's own or a prerequisite's (ae_unet's AE), is an error that names the workdir to train.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

import jax

from semiseg import checkpoint, fileio, monitor, sharding
from semiseg.data import categories, pipeline
from semiseg.methods import base, create_method, prerequisites, validate_method

log = logging.getLogger(__name__)

# (config, workdir, mesh, data) -> {name: finished TrainState} of config.method's prerequisites.
PrerequisiteResolver = Callable[..., dict[str, base.TrainState]]


def _own(config, key: str):
  """``config.<method>.<key>`` when the method's own config group sets it (e.g. ``anogan``), else None."""
  group = config.get(config.method)
  return group.get(key) if hasattr(group, 'get') else None


def primary_batch_key(config) -> str:
  """The config key that sizes the method's primary stream (named in errors)."""
  return f'config.{config.method}.batch_size' if _own(config, 'batch_size') is not None else 'config.batch_size'


def stream_batch_sizes(config, streams: tuple[str, ...]) -> dict[str, int]:
  """The primary stream gets ``batch_size`` (or the method group's own, ``config.anogan.batch_size``);
  an unlabeled secondary stream ``unlabeled_batch_size``."""
  own = _own(config, 'batch_size')
  sizes = {streams[0]: config.batch_size if own is None else int(own)}
  for s in streams[1:]:
    sizes[s] = config.unlabeled_batch_size
  return sizes


def schedule(config, num_unlabeled: int) -> tuple[int, int]:
  """(steps_per_epoch, num_train_steps).

  An epoch is one pass's worth of the category's unlabeled training images at ``batch_size``, for
  every method: with 2-9 labeled images a pass over the labeled set would be a single step, and the
  paper's "decay every 30 epochs" would then decay every 30 steps. So all methods of a category train
  for the same number of steps and decay on the same schedule, unless the method's own config group
  sets ``num_train_steps`` (``config.anogan.num_train_steps``: a GAN needs longer than a U-Net).
  """
  steps_per_epoch = config.steps_per_epoch or max(1, math.ceil(num_unlabeled / config.batch_size))
  own = _own(config, 'num_train_steps')
  if own is not None:
    total = own
  elif config.num_train_steps is not None:
    total = config.num_train_steps
  else:
    total = config.num_epochs * steps_per_epoch
  if steps_per_epoch <= 0:
    raise ValueError(f'config.steps_per_epoch must be positive, got {steps_per_epoch}.')
  if total < 0:
    raise ValueError(f'config.num_train_steps must be >= 0, got {total}.')
  return steps_per_epoch, total


def validate_config(config) -> None:
  """Values that cannot work, reported with the key and the fix before anything is built."""
  if config.batch_size <= 0:
    raise ValueError(f'config.batch_size must be positive, got {config.batch_size}.')
  own = _own(config, 'batch_size')
  if own is not None and own <= 0:
    raise ValueError(f'config.{config.method}.batch_size must be positive (or unset: config.batch_size), got {own}.')
  if config.unlabeled_batch_size <= 0:
    raise ValueError(f'config.unlabeled_batch_size must be positive, got {config.unlabeled_batch_size}.')
  if config.eval_batch_size <= 0:
    raise ValueError(f'config.eval_batch_size must be positive, got {config.eval_batch_size}.')
  if config.log_every_steps <= 0:
    raise ValueError(f'config.log_every_steps must be positive, got {config.log_every_steps}.')
  if config.data.k_labeled < 1:
    raise ValueError(f'config.data.k_labeled must be at least 1, got {config.data.k_labeled}.')
  if config.data.test_to_unlabeled < 0:
    raise ValueError(f'config.data.test_to_unlabeled must be >= 0, got {config.data.test_to_unlabeled}.')
  if config.data.image_size <= 0:
    raise ValueError(f'config.data.image_size must be positive, got {config.data.image_size}.')
  base.check_diff_channels(config.model.diff_channels)  # the score maps of AE, PCA, AnoGAN; the trivial map
  validate_method(config)  # the method's own checks, before anything (a prerequisite, say) is trained


def has_checkpoint(workdir: str) -> bool:
  ckpt_dir = os.path.join(workdir, 'ckpt')
  return os.path.isdir(ckpt_dir) and bool(checkpoint.Checkpointer(workdir, 1, 1).all_steps())


def restore_prerequisite(config, name: str, req: base.Prerequisite, workdir: str, mesh, data,
                         hint: str = '') -> base.TrainState:
  """The finished state of prerequisite ``name`` in ``workdir``; an error naming the workdir if none."""
  if not has_checkpoint(workdir):
    raise FileNotFoundError(
        f'No checkpoint in {os.path.join(workdir, "ckpt")}: {config.method} needs its prerequisite {name!r} '
        f'trained there first (python -m experiments.train --config ... --config.method={req.config.method} '
        f'--workdir {workdir}){hint}.')
  return restore_trained(req.config, workdir, mesh, data)[1]


def recorded_prerequisite_workdir(workdir: str, key: str) -> str | None:
  """The prerequisite workdir the run in ``workdir`` was trained with (its run_info.json), if recorded."""
  path = os.path.join(workdir, 'run_info.json')
  if not os.path.exists(path):
    return None
  return (fileio.read_json(path).get('config') or {}).get(key)


def prerequisite_workdir(config, name: str, req: base.Prerequisite, workdir: str | None) -> str:
  """Where a finished run finds its prerequisite: the workdir its config key names, else the one the
  run in ``workdir`` was trained with (run_info.json), else ``<workdir>/<name>``."""
  given = config.get(req.workdir_key)
  if given:
    return given
  if workdir is None:
    raise ValueError(f'{config.method} needs a trained {name!r}: set config.{req.workdir_key} or give a workdir.')
  return recorded_prerequisite_workdir(workdir, req.workdir_key) or os.path.join(workdir, name)


def restore_prerequisites(config, workdir: str | None, mesh, data) -> dict[str, base.TrainState]:
  """Every prerequisite of ``config.method``, restored, never trained (see ``prerequisite_workdir``)."""
  return {name: restore_prerequisite(config, name, req, prerequisite_workdir(config, name, req, workdir), mesh,
                                     data, hint=f' or set config.{req.workdir_key} to where it was trained')
          for name, req in prerequisites(config).items()}


def build(config, workdir: str | None, mesh=None, data: pipeline.CategoryData | None = None,
          resolve_prerequisites: PrerequisiteResolver = restore_prerequisites):
  """(method, data, ctx, mesh, num_train_steps) of a config, without touching its own checkpoints.

  Order: the category's rules applied, config checks, mesh, data (process 0 prepares the dataset and
  writes split.json first), then ``resolve_prerequisites`` (restore by default; the loop trains what
  is missing), then the method.
  """
  config = categories.apply_category_rules(config)
  validate_config(config)
  mesh = mesh or sharding.create_mesh()
  if data is None:
    data = sharding.main_process_first(lambda: pipeline.load_category(config.data, workdir),
                                       'semiseg.load_category')
  trained = resolve_prerequisites(config, workdir, mesh, data)
  steps_per_epoch, total = schedule(config, len(data.unlabeled))
  ctx = base.MethodContext(image_size=config.data.image_size, texture=data.texture,
                           steps_per_epoch=steps_per_epoch, unlabeled=data.unlabeled.images,
                           labeled=data.labeled)
  method = create_method(config, ctx, trained)
  for stream, size in stream_batch_sizes(config, method.streams).items():
    key = primary_batch_key(config) if stream == method.streams[0] else 'config.unlabeled_batch_size'
    sharding.check_batch_size(size, mesh, key)
    if len(getattr(data, stream)) == 0:
      raise ValueError(f'The {stream} split of {config.data.name}/{config.data.category} is empty; '
                       f'{config.method} needs {stream} images.')
  return method, data, ctx, mesh, total


def checkpoint_meta(config, step: int, total: int, done: bool) -> dict:
  """What a checkpoint records beside the state: progress and what it was trained for."""
  return {'step': int(step), 'num_train_steps': int(total), 'done': bool(done), 'method': config.method,
          'dataset': config.data.name, 'category': config.data.category,
          'image_size': int(config.data.image_size), 'seed': int(config.seed)}


def check_meta(meta: dict, config, where: str) -> None:
  for key, name, value in (('method', 'config.method', config.method),
                           ('image_size', 'config.data.image_size', config.data.image_size),
                           ('category', 'config.data.category', config.data.category)):
    if key in meta and meta[key] != value:
      raise ValueError(f'The checkpoint in {where} was made with {key}={meta[key]!r} but the config asks '
                       f'for {name}={value!r}: use another --workdir (or the config key naming a '
                       f'prerequisite\'s workdir, e.g. config.ae_workdir) or set {name}={meta[key]!r}.')


def _restore_from(ckpt: checkpoint.Checkpointer, method: base.Method, config, mesh):
  """(state, meta, step) of the newest readable checkpoint of ``ckpt``, or None; closes it."""
  try:
    return ckpt.restore(sharding.abstract_state(method.init, jax.random.PRNGKey(config.seed), mesh),
                        check_meta=lambda meta: check_meta(meta, config, ckpt.directory))
  finally:
    ckpt.close()


def training_health(config, workdir: str) -> dict:
  """What eval.json records of the training: the run's health.json and its prerequisites' (if any)."""
  out = {}
  own = monitor.read_health(workdir)
  if own is not None:
    out['health'] = own
  theirs = {name: monitor.read_health(wd) for name, wd in _prerequisite_workdirs(config, workdir).items()}
  theirs = {name: h for name, h in theirs.items() if h is not None}
  if theirs:
    out['prerequisite_health'] = theirs
  return out


def _prerequisite_workdirs(config, workdir: str) -> dict[str, str]:
  """{name: workdir} of the prerequisites a finished run in ``workdir`` used (where they are known)."""
  out = {}
  for name, req in prerequisites(config).items():
    try:
      out[name] = prerequisite_workdir(config, name, req, workdir)
    except ValueError:  # neither configured nor recorded
      pass
  return out


def write_training_curves(config, workdir: str) -> str | None:
  """``<workdir>/curves.png``: the run's loss against step, and its prerequisites' (the AE's) beside it."""
  from semiseg import figures  # matplotlib only when a figure is drawn
  runs = {name: os.path.join(wd, 'metrics.jsonl') for name, wd in _prerequisite_workdirs(config, workdir).items()}
  runs[config.method] = os.path.join(workdir, 'metrics.jsonl')
  runs = {m: p for m, p in runs.items() if os.path.exists(p)}
  if not runs:
    return None
  path = os.path.join(workdir, 'curves.png')
  figures.training_curves(path, runs, title=f'{config.data.category}, seed {config.seed}')
  return path


def restore_trained(config, workdir: str, mesh=None, data=None):
  """(method, state, data, ctx, mesh) from a finished workdir, for evaluation and prediction."""
  config = categories.apply_category_rules(config)
  method, data, ctx, mesh, _ = build(config, workdir, mesh, data)
  restored = _restore_from(checkpoint.Checkpointer(workdir, config.ckpt.every_steps, config.ckpt.keep), method,
                           config, mesh)
  if restored is None:
    raise FileNotFoundError(f'No checkpoint in {os.path.join(workdir, "ckpt")}: train first with '
                            f'python -m experiments.train --workdir {workdir}.')
  state, meta, _ = restored
  check_meta(meta, config, workdir)
  if meta.get('image_size') not in (None, config.data.image_size):
    raise ValueError(f'{workdir} was trained at image_size={meta["image_size"]} but '
                     f'config.data.image_size={config.data.image_size}.')
  if not meta.get('done', True):
    log.warning('%s: checkpoint at step %s of %s (training not finished).', workdir, meta.get('step'),
                meta.get('num_train_steps'))
  return method, state, data, ctx, mesh
