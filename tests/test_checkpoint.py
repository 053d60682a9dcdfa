"""The checkpoint digest reduced on the device: against a numpy reference, sensitive to any changed word,
and checkpoints saved with the former host SHA-256 still verified."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from semiseg import checkpoint


def _state():
  rng = np.random.default_rng(0)
  return {'w': jnp.asarray(rng.standard_normal((7, 5), np.float32)),
          'h': jnp.asarray(rng.standard_normal((3, 4)), jnp.bfloat16),
          'step': jnp.array(12, jnp.int32), 'key': jax.random.PRNGKey(3),
          'flag': jnp.array([True, False]), 'pix': jnp.arange(5, dtype=jnp.uint8), 'empty': jnp.zeros((0, 3))}


def _numpy_checksums(leaf) -> np.ndarray:
  """The per-leaf lanes by hand in numpy (uint64 arithmetic reduced mod 2^32)."""
  a = np.ravel(np.asarray(leaf))
  words = a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]).astype(np.uint64)
  mask = np.uint64(0xFFFFFFFF)

  def fmix(h):
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & mask
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & mask
    return h ^ (h >> np.uint64(16))
  i = np.arange(words.size, dtype=np.uint64)
  lanes = [int(fmix(words ^ ((i * np.uint64(0x9E3779B9) + np.uint64(salt)) & mask)).sum()) & 0xFFFFFFFF
           for salt in (0x7F4A7C15, 0x2545F491)]
  return np.array(lanes, np.uint32)


def test_device_checksums_match_a_numpy_reference():
  leaves = list(_state().values())
  got = np.asarray(checkpoint._device_checksums(leaves))
  expected = np.stack([_numpy_checksums(x) for x in leaves])
  np.testing.assert_array_equal(got, expected)


def test_digest_sees_any_changed_word_and_not_where_the_state_lives():
  state = _state()
  digest = checkpoint.device_digest(state)
  assert digest == checkpoint.device_digest(jax.tree.map(np.asarray, state))  # host copy, same digest
  checkpoint.compile_digest(state)  # the precompiled path gives the same answer
  assert checkpoint.device_digest(state) == digest
  w = np.asarray(state['w'])
  for changed in (
      {**state, 'w': state['w'].at[3, 2].set(np.nextafter(w[3, 2], np.inf))},  # one bit of one float
      {**state, 'w': jnp.asarray(w.ravel()[[1, 0] + list(range(2, w.size))].reshape(w.shape))},  # two swapped
      {**state, 'h': state['h'].at[0, 0].add(1)},
      {**state, 'step': state['step'] + 1},
      {**state, 'flag': ~state['flag']},
      {**state, 'w': state['w'].reshape(5, 7)}):  # same bytes, another shape
    assert checkpoint.device_digest(changed) != digest


def test_former_host_sha256_checkpoints_are_still_verified(tmp_path, caplog):
  """A checkpoint whose meta has no digest kind holds the SHA-256 of the leaves' bytes (before the device
  digest): it restores when that matches and is refused as damaged when it does not."""
  state = {'w': jnp.arange(6.0).reshape(2, 3), 'step': jnp.array(1, jnp.int32)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=3)
  ckpt.save(1, state, {'step': 1}, force=True)
  for step, digest in ((2, checkpoint.state_digest(state)), (3, '0' * 64)):
    meta = {'step': step, checkpoint.STRUCTURE_KEY: checkpoint.structure_digest(state),
            checkpoint.DIGEST_KEY: digest}
    ckpt.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
  ckpt.wait()
  meta1 = json.load(open(os.path.join(tmp_path, 'ckpt', '1', 'meta', 'metadata')))
  assert meta1[checkpoint.DIGEST_KIND_KEY] == checkpoint.DEVICE_DIGEST
  restored, meta, step = ckpt.restore(abstract)
  assert step == 2 and 'do not match the SHA-256' in caplog.text  # 3 refused, the former kind at 2 accepted
  np.testing.assert_array_equal(restored['w'], state['w'])
  ckpt.close()


@pytest.mark.parametrize('kind', ['device', 'host'])
def test_the_digest_is_checked_on_restore(tmp_path, kind):
  state = {'w': jnp.arange(6.0).reshape(2, 3)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=3)
  ckpt.save(1, state, {'step': 1}, force=True)
  ckpt.wait()
  meta_file = os.path.join(tmp_path, 'ckpt', '1', 'meta', 'metadata')
  meta = json.load(open(meta_file))
  if kind == 'host':
    del meta[checkpoint.DIGEST_KIND_KEY]
  meta[checkpoint.DIGEST_KEY] = checkpoint.device_digest({'w': state['w'] + 1})
  json.dump(meta, open(meta_file, 'w'))
  ckpt.manager.reload()
  with pytest.raises(RuntimeError, match='No checkpoint'):
    ckpt.restore(abstract)
  ckpt.close()
