"""A finished run back from its workdir, for evaluation and prediction: its checkpoint, its prerequisites'
and its health. Nothing here trains.

A missing checkpoint, the run's own or a prerequisite's (ae_unet's AE), is an error that names the
workdir to train. Building a run from its config is semiseg/run.py's; training one semiseg/train.py's.
"""

from __future__ import annotations

import logging
import os

import jax

from semiseg import checkpoint, fileio, monitor, sharding
from semiseg.methods import base, prerequisites
from semiseg.run import Run, resolve

log = logging.getLogger(__name__)


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
  return restore_trained(req.config, workdir, mesh, data).state


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


def restore_prerequisites(config, workdir: str | None, mesh, data) -> dict[str, tuple[base.TrainState, str]]:
  """Every prerequisite of ``config.method``, restored, never trained (see ``prerequisite_workdir``),
  with its workdir: ``run.resolve``'s resolver for a finished run."""
  out = {}
  for name, req in prerequisites(config).items():
    wd = prerequisite_workdir(config, name, req, workdir)
    out[name] = (restore_prerequisite(config, name, req, wd, mesh, data,
                                      hint=f' or set config.{req.workdir_key} to where it was trained'), wd)
  return out


def restore_state(run: Run, ckpt: checkpoint.Checkpointer):
  """(state, meta, step) of the newest readable checkpoint of ``ckpt`` for ``run``'s method, or None."""
  return ckpt.restore(sharding.abstract_state(run.method.init, jax.random.PRNGKey(run.config.seed), run.mesh),
                      check_meta=lambda meta: run.check_meta(meta, ckpt.directory))


def restore_trained(config, workdir: str, mesh=None, data=None) -> Run:
  """The run of ``config`` in a finished ``workdir``, with its restored state (``Run.state``)."""
  run = resolve(config, workdir, restore_prerequisites, mesh, data)
  ckpt = checkpoint.Checkpointer(workdir, run.config.ckpt.every_steps, run.config.ckpt.keep)
  try:
    restored = restore_state(run, ckpt)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'No checkpoint in {os.path.join(workdir, "ckpt")}: train first with '
                            f'python -m experiments.train --workdir {workdir}.')
  state, meta, _ = restored
  if not meta.get('done', True):
    log.warning('%s: checkpoint at step %s of %s (training not finished).', workdir, meta.get('step'),
                meta.get('num_train_steps'))
  return run.with_state(state)


def training_health(config, workdir: str) -> dict:
  """What eval.json records of the training: the run's health.json and its prerequisites' (if any)."""
  out = {}
  own = monitor.read_health(workdir)
  if own is not None:
    out['health'] = own
  theirs = {name: monitor.read_health(wd) for name, wd in prerequisite_workdirs(config, workdir).items()}
  theirs = {name: h for name, h in theirs.items() if h is not None}
  if theirs:
    out['prerequisite_health'] = theirs
  return out


def prerequisite_workdirs(config, workdir: str) -> dict[str, str]:
  """{name: workdir} of the prerequisites a finished run in ``workdir`` used (where they are known)."""
  out = {}
  for name, req in prerequisites(config).items():
    try:
      out[name] = prerequisite_workdir(config, name, req, workdir)
    except ValueError:  # neither configured nor recorded
      pass
  return out
