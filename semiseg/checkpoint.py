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
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from semiseg import sharding

log = logging.getLogger(__name__)

DIGEST_KEY = 'state_sha256'  # meta field: hash of the state's leaves at save time
DIGEST_KIND_KEY = 'state_digest_kind'  # meta field: how DIGEST_KEY was computed (absent: host_sha256)
DEVICE_DIGEST = 'device_fmix32x2'  # device_digest's scheme
STRUCTURE_KEY = 'state_structure'  # meta field: hash of the leaves' paths, shapes and dtypes


def _leaves(state: Any) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]


def structure_digest(state: Any) -> str:
  """Paths, shapes and dtypes of the leaves (also of an abstract state): which model a checkpoint is for."""
  text = ';'.join(f'{p}:{tuple(x.shape)}:{np.dtype(x.dtype).str}' for p, x in _leaves(state))
  return hashlib.sha256(text.encode()).hexdigest()


def state_digest(state: Any) -> str | None:
  """SHA-256 of every leaf's bytes on the host: the digest of checkpoints saved before
  ``device_digest`` (meta without DIGEST_KIND_KEY), still checked on restore. None when a leaf is not
  replicated on this process."""
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


_FMIX_1, _FMIX_2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_GOLDEN = np.uint32(0x9E3779B9)  # 2^32 / golden ratio: i * _GOLDEN spreads consecutive indices apart
_LANE_SALTS = (np.uint32(0x7F4A7C15), np.uint32(0x2545F491))  # one per 32-bit lane of a leaf's checksum


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 that mixes every input bit into every output bit."""
  h = h ^ (h >> 16)
  h = h * _FMIX_1
  h = h ^ (h >> 13)
  h = h * _FMIX_2
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """A leaf's bits as a flat uint32 vector (1- and 2-byte elements widened, 8-byte ones split)."""
  x = jnp.ravel(x)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jnp.ravel(jax.random.key_data(x))
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jnp.ravel(jax.lax.bitcast_convert_type(x, unsigned)).astype(jnp.uint32)


@jax.jit
def _device_checksums(leaves: list[jax.Array]) -> jax.Array:
  """[leaves, 2] uint32: per leaf and lane, the sum mod 2^32 of fmix32(word ^ (index * golden + salt)).

  Every word's term is a bijection of its value, salted by its position, so any change of one word
  changes both lanes (and several changed words go unnoticed with odds of about 2^-64); modular sums
  do not depend on the order XLA reduces in, so the result is the same on every device and sharding.
  """
  out = []
  for x in leaves:
    w = _words(x)
    i = jax.lax.iota(jnp.uint32, w.size)
    out.append(jnp.stack([jnp.sum(_fmix32(w ^ (i * _GOLDEN + salt)), dtype=jnp.uint32) for salt in _LANE_SALTS])
               if w.size else jnp.zeros((len(_LANE_SALTS),), jnp.uint32))
  return jnp.stack(out) if out else jnp.zeros((0, len(_LANE_SALTS)), jnp.uint32)


_COMPILED_CHECKSUMS: dict[tuple, Any] = {}  # leaves' (shape, dtype, sharding) -> compiled _device_checksums


def _checksum_key(leaves: list) -> tuple:
  return tuple((tuple(np.shape(x)), str(getattr(x, 'dtype', None)), getattr(x, 'sharding', None)) for x in leaves)


def compile_digest(state: Any) -> None:
  """Compiles ``device_digest`` for ``state``'s leaves now (the loop calls it before its first step), so
  that the first checkpoint does not wait for the compilation."""
  leaves = [x for _, x in _leaves(state)]
  key = _checksum_key(leaves)
  if key not in _COMPILED_CHECKSUMS:
    # run-once code (sharding.run_once_compiler_options): a few calls per run; at level 0 the U-Net's
    # compiled in 2.2 s instead of 3.6 s and ran in 15 ms instead of 10 ms
    _COMPILED_CHECKSUMS[key] = _device_checksums.lower(leaves).compile(sharding.run_once_compiler_options())


def device_digest(state: Any) -> str:
  """A digest of every leaf's bits computed where the state lives, so restore can tell a silently
  damaged array file (Orbax reads some byte-level damage without an error).

  The leaves are reduced on their devices to 8 bytes each (``_device_checksums``, one jitted call)
  and only those come to the host, into a SHA-256 with the leaves' paths, shapes and dtypes: no copy
  of the state and no hashing of its bytes on the host, which on an accelerator would stall the
  training loop at every save. Works on any sharding and process count (every process calls it).
  """
  leaves = _leaves(state)
  arrays = [x for _, x in leaves]
  sums = _COMPILED_CHECKSUMS.get(_checksum_key(arrays), _device_checksums)(arrays)
  if not sums.is_fully_addressable:
    sums = sums.addressable_data(0)  # replicated: the reduction's result is on every device
  h = hashlib.sha256(DEVICE_DIGEST.encode())
  for (path, x), lanes in zip(leaves, np.asarray(sums)):
    dtype = jax.dtypes.canonicalize_dtype(getattr(x, 'dtype', None) or np.result_type(x))
    h.update(f'{path}:{tuple(np.shape(x))}:{dtype};'.encode())
    h.update(lanes.astype('<u4').tobytes())
  return h.hexdigest()


def _digest_matches(state: Any, meta: dict) -> bool:
  """Whether ``state`` has the digest saved in ``meta`` (True when meta has none or it cannot be computed)."""
  saved = meta.get(DIGEST_KEY)
  if not saved:
    return True
  if meta.get(DIGEST_KIND_KEY) == DEVICE_DIGEST:
    return device_digest(state) == saved
  return state_digest(state) in (None, saved)  # saved before device_digest: the host SHA-256 of the bytes


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

  def __init__(self, workdir: str, every_steps: int, keep: int):
    if every_steps <= 0:
      raise ValueError(f'config.ckpt.every_steps must be positive, got {every_steps}.')
    if keep <= 0:
      raise ValueError(f'config.ckpt.keep must be positive, got {keep}.')
    self.directory = os.path.join(os.path.abspath(workdir), 'ckpt')
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

  def should_save(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
    # The digest is reduced on the device (device_digest): no host copy or host hashing of the state
    # beside the one Orbax's async save makes.
    meta = {**meta, STRUCTURE_KEY: structure_digest(state), DIGEST_KEY: device_digest(state),
            DIGEST_KIND_KEY: DEVICE_DIGEST}
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
        if not _digest_matches(state, meta):
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
