"""Orbax behind one wrapper: save every N steps, keep K, restore the latest good one onto the mesh."""

from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """``CheckpointManager(workdir/ckpt)`` saving ``{state, meta}``; restore falls back past a bad step."""

  def __init__(self, workdir: str, every_steps: int, keep: int):
    if every_steps <= 0:
      raise ValueError(f'config.ckpt.every_steps must be positive, got {every_steps}.')
    if keep <= 0:
      raise ValueError(f'config.ckpt.keep must be positive, got {keep}.')
    self.directory = os.path.join(os.path.abspath(workdir), 'ckpt')
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True),
        item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
    """Restores the newest readable checkpoint into ``abstract_state``'s shapes and shardings.

    A truncated or corrupt newest checkpoint is reported and the previous one tried. Returns
    ``(state, meta, step)`` or None when the workdir has no checkpoint.
    """
    steps = self.all_steps()
    failed = []
    for step in reversed(steps):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as e:  # Orbax raises various types for missing/corrupt files.
        failed.append(step)
        log.warning('Checkpoint %s/%d could not be restored (%s: %s); trying an older one.',
                    self.directory, step, type(e).__name__, str(e).splitlines()[0] if str(e) else '')
        continue
      if failed:
        log.warning('Restored checkpoint step %d after checkpoint(s) %s in %s failed to load.',
                    step, failed, self.directory)
      return restored['state'], dict(restored['meta'] or {}), step
    if failed:
      raise RuntimeError(f'No checkpoint in {self.directory} could be restored (tried steps {failed}); '
                         'delete that folder to start from scratch.')
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
