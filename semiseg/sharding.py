"""One data-parallel mesh over every device of every host; state replicated, batches split on 'data'."""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Starts ``jax.distributed`` when flags or the usual cluster environment variables ask for it.

  Flags win; otherwise JAX's own cluster detection (``JAX_COORDINATOR_ADDRESS``, SLURM, TPU pods...)
  is used when one of those variables is set. A single process on one host does nothing.
  """
  if coordinator_address or num_processes or process_id is not None:
    if not (coordinator_address and num_processes and process_id is not None):
      raise ValueError('Multi-host start needs all of --coordinator_address, --num_processes and '
                       '--process_id (or none of them).')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif any(v in os.environ for v in ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES',
                                     'OMPI_COMM_WORLD_SIZE')):
    jax.distributed.initialize()


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
