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


_barrier_count = 0


def _client():
  from jax._src import distributed  # the client jax.distributed.initialize made; Orbax uses it too
  return distributed.global_state.client


def barrier(name: str, timeout_s: float = 3600.0) -> str:
  """Every process waits here for the others (no-op with one process); returns the barrier's id.

  The coordination service's barrier, not a device collective: CPU (gloo) collectives give up when
  processes arrive more than 30 s apart, and a dataset build on process 0 can take minutes.
  """
  global _barrier_count
  _barrier_count += 1  # every process calls barriers in the same order, so the ids agree
  barrier_id = f'semiseg:{name}:{_barrier_count}'
  if jax.process_count() == 1:
    return barrier_id
  if _client() is None:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(barrier_id)
  else:
    _client().wait_at_barrier(barrier_id, int(timeout_s * 1000))
  return barrier_id


def main_process_first(fn: Callable[[], T], name: str) -> T:
  """``fn()`` on process 0, then on the other processes, then everyone continues together.

  For one-time work on shared files that every process then reads: TFDS dataset preparation and
  ``split.json``. Without it, processes on one file system race on the same files. When ``fn`` fails
  on process 0, the others stop with an error that points to it instead of waiting. The last barrier
  keeps the processes in step, so their first collective does not wait for a slow reader.
  """
  if jax.process_count() == 1:
    return fn()
  client, failed_key = _client(), f'semiseg:{name}:failed:{_barrier_count + 1}'
  out, error = None, None
  if jax.process_index() == 0:
    try:
      out = fn()
    except Exception as e:  # told to the others, then raised here
      error = e
      if client is not None:
        client.key_value_set(failed_key, f'{type(e).__name__}: {e}'.splitlines()[0][:500])
  barrier(f'{name}:main_done')
  if error is not None:
    raise error
  if jax.process_index() != 0:
    message = None
    if client is not None:
      try:
        message = client.key_value_try_get(failed_key)
      except Exception:  # not set: process 0 succeeded
        message = None
    if message:
      raise RuntimeError(f'Process 0 failed in {name} ({message}); see its log.')
    out = fn()
  barrier(f'{name}:all_done')
  return out


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


def from_full_array(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array every process holds whole -> one global array (e.g. all images of a split).

  Rows are split on ``data`` when their count divides by the device count (each process gives its
  own rows), else the array is replicated.
  """
  if len(x) % mesh.devices.size == 0:
    n = len(x) // jax.process_count()
    return to_global(x[jax.process_index() * n:(jax.process_index() + 1) * n], mesh)
  return jax.make_array_from_process_local_data(replicated(mesh), x, x.shape)


# XLA options for a function a run calls once or a few times (the state's init, a checkpoint's digest):
# the backend's lowest optimization level. Its compile time is what such a call costs, and XLA:CPU spent
# most of it optimizing the initializers' random-number code: the CPU config's U-Net init compiled in
# 17.7 s by default and 3.4 s at level 0 (2 cores), and every trained cell compiles one. The values are
# the same up to float rounding (at most 1 ulp apart in the truncated-normal kernels), and the same on
# every call of one build. Used on the CPU only: on GPUs and TPUs the option is unmeasured, and there
# the default compile is kept.
RUN_ONCE_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def run_once_compiler_options() -> dict:
  return dict(RUN_ONCE_COMPILER_OPTIONS) if jax.default_backend() == 'cpu' else {}


def compile_run_once(fn: Callable, *args, **jit_kwargs):
  """``jax.jit(fn, **jit_kwargs)`` compiled for ``args`` with ``run_once_compiler_options()``."""
  return jax.jit(fn, **jit_kwargs).lower(*args).compile(run_once_compiler_options())


def create_sharded_state(init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh) -> Any:
  """State born on the mesh, replicated: ``jax.jit(init, out_shardings=...)``, compiled as run-once code."""
  abstract = jax.eval_shape(init_fn, key)
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
  return compile_run_once(init_fn, key, out_shardings=shardings)(key)


def abstract_state(init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh) -> Any:
  """Shape/dtype/sharding tree of the state, for restoring a checkpoint straight onto the mesh."""
  abstract = jax.eval_shape(init_fn, key)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), abstract)
