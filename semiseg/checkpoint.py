"""Orbax behind one wrapper: save every N steps, keep K, restore the latest good one onto the mesh."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import sys
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from semiseg import sharding

log = logging.getLogger(__name__)

DIGEST_KEY = 'state_sha256'  # meta field: hash of the state's leaves at save time
STRUCTURE_KEY = 'state_structure'  # meta field: hash of the leaves' paths, shapes and dtypes


def _leaves(state: Any) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]


def structure_digest(state: Any) -> str:
  """Paths, shapes and dtypes of the leaves (also of an abstract state): which model a checkpoint is for."""
  text = ';'.join(f'{p}:{tuple(x.shape)}:{np.dtype(x.dtype).str}' for p, x in _leaves(state))
  return hashlib.sha256(text.encode()).hexdigest()


def state_digest(state: Any) -> str | None:
  """SHA-256 of every leaf's bytes, so restore can tell a silently damaged array file (Orbax reads
  some byte-level damage without an error). None when a leaf is not replicated on this process."""
  h = hashlib.sha256()
  for path, leaf in _leaves(state):
    if isinstance(leaf, jax.Array):
      if leaf.is_fully_addressable:
        leaf = np.asarray(leaf)
      elif leaf.is_fully_replicated:
        leaf = np.asarray(leaf.addressable_data(0))
      else:
        return None
    leaf = np.ascontiguousarray(leaf)
    h.update(f'{path}:{leaf.shape}:{leaf.dtype.str};'.encode())
    h.update(leaf.tobytes())
  return h.hexdigest()


def _collect_abandoned_reads() -> None:
  """Finalizes the read coroutines a failed Orbax restore leaves behind, now and quietly.

  Each would otherwise print its TensorStore error again as "Exception ignored in <coroutine ...>"
  when collected, often at interpreter exit; the failure is already reported by our warning.
  """
  previous = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: log.debug('Abandoned checkpoint read: %s', unraisable.exc_value)
  try:
    gc.collect()
  finally:
    sys.unraisablehook = previous


class Checkpointer:
  """``CheckpointManager(workdir/ckpt)`` saving ``{state, meta}``; restore falls back past a bad step."""

  def __init__(self, workdir: str, every_steps: int, keep: int, subdir: str = 'ckpt'):
    if every_steps <= 0:
      raise ValueError(f'config.ckpt.every_steps must be positive, got {every_steps}.')
    if keep <= 0:
      raise ValueError(f'config.ckpt.keep must be positive, got {keep}.')
    self.directory = os.path.join(os.path.abspath(workdir), subdir)
    self.every_steps = every_steps
    self.failed_steps: list[int] = []  # steps newer than the last restored one that could not be read
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True),
        item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_meta(self) -> dict | None:
    """The newest checkpoint's meta (no array is read), or None when there is none or it is unreadable."""
    step = self.latest_step()
    if step is None:
      return None
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'] or {})
    except Exception as e:  # Orbax raises various types for missing/corrupt files.
      self._warn(step, e)
      return None

  def should_save(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
    meta = {**meta, STRUCTURE_KEY: structure_digest(state), DIGEST_KEY: state_digest(state)}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: Any,
              check_meta: Callable[[dict], None] | None = None) -> tuple[Any, dict, int] | None:
    """Restores the newest readable checkpoint into ``abstract_state``'s shapes and shardings.

    ``check_meta(meta)`` runs before any array is read and may raise (a checkpoint made for another
    config is an error, not damage). A truncated or corrupt newest checkpoint (unreadable, or its
    arrays differ from the hash saved with it) is reported and the previous one tried; the steps
    that failed are left in ``failed_steps``. Returns ``(state, meta, step)`` or None when the
    workdir has no checkpoint.
    """
    self.failed_steps = []
    failed = []
    for step in reversed(self.all_steps()):
      try:
        meta = dict(self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))['meta'] or {})
      except Exception as e:  # Orbax raises various types for missing/corrupt files.
        failed.append(step)
        self._warn(step, e)
        continue
      if check_meta is not None:
        check_meta(meta)
      if meta.get(STRUCTURE_KEY) not in (None, structure_digest(abstract_state)):
        raise ValueError(f'The checkpoint {self.directory}/{step} holds a state of other shapes than this '
                         'config builds (the model or method settings changed): use another --workdir '
                         'or the config it was trained with.')
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))['state']
        if meta.get(DIGEST_KEY) and state_digest(state) not in (None, meta[DIGEST_KEY]):
          raise ValueError('its arrays do not match the SHA-256 saved with them (damaged files)')
      except Exception as e:
        failed.append(step)
        self._warn(step, e)
        continue
      if failed:
        log.warning('Restored checkpoint %s/%d instead of the newer %s, which could not be read.',
                    self.directory, step, ', '.join(f'{self.directory}/{s}' for s in failed))
      self.failed_steps = failed
      return state, meta, step
    if failed:
      raise RuntimeError(f'No checkpoint in {self.directory} could be restored (tried steps {failed}); '
                         'delete that folder to start from scratch.')
    return None

  def _warn(self, step: int, e: Exception) -> None:
    _collect_abandoned_reads()
    log.warning('Checkpoint %s/%d could not be restored (%s: %s); trying an older one.',
                self.directory, step, type(e).__name__, str(e).splitlines()[0] if str(e) else '')

  def set_aside_failed(self) -> None:
    """Moves the steps the last restore could not read to ``ckpt.corrupt/`` (kept for inspection),
    so that the resumed run can save those steps again."""
    if not self.failed_steps:
      return
    aside = self.directory + '.corrupt'
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in self.failed_steps:
        target = os.path.join(aside, str(step))
        n = 1
        while os.path.exists(target):
          target, n = os.path.join(aside, f'{step}.{n}'), n + 1
        shutil.move(os.path.join(self.directory, str(step)), target)
        log.warning('Moved the unreadable checkpoint %s/%d to %s.', self.directory, step, target)
    sharding.barrier('checkpoint.set_aside_failed')  # the others reload after process 0 moved them
    self.failed_steps = []
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
