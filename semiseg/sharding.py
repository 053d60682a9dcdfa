"""One data-parallel mesh over every device of every host; state replicated, batches split on 'data'."""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
T = TypeVar('T')


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Starts ``jax.distributed`` when flags or the usual cluster environment variables ask for it.

  Flags win, then ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` when
  no cluster manager says them), then JAX's own detection of a job of several processes (SLURM, Open
  MPI, Cloud TPU). A single process on one host does nothing. Returns whether it initialized.
  Must run before anything touches a JAX backend.
  """
  env = os.environ
  if coordinator_address or num_processes or process_id is not None:
    if not (coordinator_address and num_processes and process_id is not None):
      raise ValueError('Multi-host start needs all of --coordinator_address, --num_processes and '
                       '--process_id (or none of them).')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if env.get('JAX_COORDINATOR_ADDRESS'):
    count, index = env.get('JAX_NUM_PROCESSES'), env.get('JAX_PROCESS_ID')
    jax.distributed.initialize(env['JAX_COORDINATOR_ADDRESS'], int(count) if count else None,
                               int(index) if index else None)
    return True
  several = (int(env.get('SLURM_NTASKS', '1') or 1) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1
             or ',' in env.get('TPU_WORKER_HOSTNAMES', ''))
  if several:
    jax.distributed.initialize()
  return several


def main_process_first(fn: Callable[[], T], name: str) -> T:
  """``fn()`` on process 0, a barrier, then ``fn()`` on the other processes.

  For one-time work on shared files that every process then reads: TFDS dataset preparation and
  ``split.json``. Without it, processes on one file system race on the same files. ``name`` labels
  the barrier (every process must pass the same one).
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(name)
  return fn() if jax.process_index() != 0 else out


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``data`` over all devices of all processes."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, key: str = 'config.batch_size') -> None:
  """The global batch must split evenly over devices and processes."""
  n = mesh.devices.size
  if global_batch % n:
    lower, upper = (global_batch // n) * n, (global_batch // n + 1) * n
    raise ValueError(f'{key}={global_batch} does not divide by the {n} devices of the mesh: use a '
                     f'multiple of {n}, e.g. {key}={upper}' + (f' or {lower}' if lower else '') + '.')
  if global_batch % jax.process_count():
    raise ValueError(f'{key}={global_batch} does not divide by the {jax.process_count()} processes.')


def to_global(local_batch: Any, mesh: Mesh) -> Any:
  """Process-local numpy rows -> global ``jax.Array``s sharded on ``data`` (leading axis)."""
  sharding = data_sharded(mesh)
  def one(x):
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree.map(one, local_batch)


def create_sharded_state(init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh) -> Any:
  """State born on the mesh, replicated: ``jax.jit(init, out_shardings=...)``."""
  abstract = jax.eval_shape(init_fn, key)
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
  return jax.jit(init_fn, out_shardings=shardings)(key)


def abstract_state(init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh) -> Any:
  """Shape/dtype/sharding tree of the state, for restoring a checkpoint straight onto the mesh."""
  abstract = jax.eval_shape(init_fn, key)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), abstract)
