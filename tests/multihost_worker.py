"""Child process of the sharding tests: fake CPU devices, optional ``jax.distributed``, one JSON answer.

Usage (the tests start it; by hand it is also the images/s check of the AE + U-Net step):
  python tests/multihost_worker.py steps --devices 4 --out /tmp/steps.json
  python tests/multihost_worker.py train --devices 2 --workdir /tmp/w --out /tmp/p0.npz \\
      --coordinator_address localhost:12345 --num_processes 2 --process_id 0
  python tests/multihost_worker.py bench --devices 4 --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _setup(devices: int) -> None:
  """Fake devices and the tests' compile cache; must run before jax is imported."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  os.environ['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TQDM_DISABLE', '1')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  cache = os.environ.get('SEMISEG_TEST_JAX_CACHE', '/tmp/semiseg-test-jax-cache')
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def create_tiny(name: str, size: int, batch: int):
  """(method, numpy batch) of a registry method at a tiny size (semiseg.methods.testing); the state is
  made here on each mesh."""
  from configs import synthetic
  from semiseg.methods import testing
  config = testing.shrink(synthetic.get_config(f'washer,smoke,method={name}'), image_size=size, batch_size=batch)
  method = testing.create_untrained(config, testing.context(config))
  return method, testing.fixed_batch(method.streams, size, batch)


def _run_steps(method, batch_np, mesh, num_steps: int):
  """``num_steps`` jitted steps on ``mesh`` from the same init; (state, losses, batch shard shapes)."""
  import jax
  from semiseg import sharding
  key = jax.random.PRNGKey(0)
  state = sharding.create_sharded_state(method.init, key, mesh)
  if method.extras is not None:
    state = state.replace(extras=jax.device_put(method.extras, sharding.replicated(mesh)))
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  step = jax.jit(method.train_step, out_shardings=(state_sharding, sharding.replicated(mesh)))
  batch = sharding.to_global(batch_np, mesh)
  leaf = jax.tree.leaves(batch)[0]
  shards = sorted({tuple(s.data.shape) for s in leaf.addressable_shards})
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return state, losses, {'spec': str(leaf.sharding.spec), 'shard_shapes': shards,
                         'state_replicated': all(x.sharding.is_fully_replicated
                                                 for x in jax.tree.leaves(state))}


def cmd_steps(args) -> dict:
  """Every registry method with a train step: all devices vs one device, same global batch."""
  import jax
  import numpy as np
  from semiseg import sharding
  from semiseg.methods import REGISTRY
  names = [n for n in args.methods.split(',') if n] or list(REGISTRY)
  full, one = sharding.create_mesh(), sharding.create_mesh(jax.devices()[:1])
  out = {'device_count': jax.device_count(), 'methods': {}}
  for name in names:
    method, batch = create_tiny(name, args.size, args.batch)
    if method.train_step is None:
      continue
    t0 = time.perf_counter()
    s_full, l_full, info = _run_steps(method, batch, full, args.num_steps)
    s_one, l_one, _ = _run_steps(method, batch, one, args.num_steps)
    diff = max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
               for a, b in zip(jax.tree.leaves(s_full.params), jax.tree.leaves(s_one.params)))
    scale = max(float(np.max(np.abs(np.asarray(b, np.float32)))) for b in jax.tree.leaves(s_one.params))
    out['methods'][name] = {'loss_full': l_full, 'loss_one': l_one, 'max_param_diff': diff,
                            'max_param_abs': scale, 'step': int(s_full.step), 'seconds': time.perf_counter() - t0,
                            **info}
  return out


def cmd_train(args) -> dict:
  """The real loop (and evaluation) on the ``:smoke`` AE + U-Net config; parameters saved per process."""
  from semiseg import sharding
  sharding.maybe_initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  import jax
  import numpy as np
  from configs import synthetic
  from semiseg import evaluate, train
  from semiseg.methods import unet
  results = {}
  for steps in [int(s) for s in args.steps.split(',')]:
    # Head prior 0.5: with the default 0.01 the tiny U-Net's first gradients are ~1e-7, so Adam's
    # g / sqrt(v) turns float rounding of the cross-host sums into lr-sized steps and the one-process
    # reference drifts by chance; at 0.5 every pixel gives a real gradient.
    unet.PRIOR = 0.5  # read when the U-Net is created
    config = synthetic.get_config(f'washer,smoke,num_train_steps={steps},ae_num_train_steps=2')
    result = train.train(config, args.workdir, progress=False)
    results[steps] = result
  ev = evaluate.evaluate(result.method, result.state, result.data, result.ctx, result.mesh, config,
                         args.workdir, time_it=False)
  np.savez(args.out, *[np.asarray(x) for x in jax.tree.leaves(result.state.params)])
  from jax.experimental import multihost_utils
  from semiseg import sharding
  full_arrays = {}  # every process holds the whole array: split on 'data' when it divides, else replicated
  for n in (8, 10):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    g = sharding.from_full_array(x, result.mesh)
    back = multihost_utils.process_allgather(g, tiled=True) if not g.is_fully_replicated else g
    full_arrays[n] = {'equal': bool(np.array_equal(np.asarray(back), x)), 'spec': str(g.sharding.spec)}
  return {'full_arrays': full_arrays, 'process_index': jax.process_index(), 'process_count': jax.process_count(),
          'device_count': jax.device_count(), 'local_device_count': jax.local_device_count(),
          'resumed_from': {str(k): r.resumed_from for k, r in results.items()},
          'step': int(jax.device_get(result.state.step)), 'test': ev['test'],
          'num_test_images': ev['num_test_images']}


def cmd_first(args) -> dict:
  """``main_process_first``: order of the calls, and a failure on process 0 reaching process 1."""
  from semiseg import sharding
  sharding.maybe_initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  import jax
  marker = os.path.join(args.workdir, 'written_by_0')
  os.makedirs(args.workdir, exist_ok=True)

  def write_once() -> bool:  # process 0 writes; the others must find it already there
    if jax.process_index() == 0:
      time.sleep(1.0)
      with open(marker, 'w') as f:
        f.write('0')
    return os.path.exists(marker)

  seen = sharding.main_process_first(write_once, 'write_once')

  def fail_on_0() -> int:
    if jax.process_index() == 0:
      raise ValueError('config.data.root is missing')
    return 1

  try:
    sharding.main_process_first(fail_on_0, 'fail_on_0')
    error = None
  except (ValueError, RuntimeError) as e:
    error = f'{type(e).__name__}: {e}'
  return {'process_index': jax.process_index(), 'seen': seen, 'error': error}


def cmd_bench(args) -> dict:
  """Images/s of the jitted AE + U-Net train step on every (fake) device, after one warm-up step."""
  import jax
  from semiseg import sharding
  method, batch_np = create_tiny('ae_unet', args.size, args.batch)
  mesh = sharding.create_mesh()
  batch = sharding.to_global(batch_np, mesh)
  state = sharding.create_sharded_state(method.init, jax.random.PRNGKey(0), mesh)
  state = state.replace(extras=jax.device_put(method.extras, sharding.replicated(mesh)))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  step = jax.jit(method.train_step, out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  state, m = step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(args.num_steps):
    state, m = step(state, batch)
  jax.block_until_ready((state, m))
  dt = time.perf_counter() - t0
  return {'device_count': jax.device_count(), 'batch': args.batch, 'size': args.size,
          'images_per_s': args.num_steps * args.batch / dt, 'loss': float(m['loss'])}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('cmd', choices=('steps', 'train', 'first', 'bench'))
  p.add_argument('--devices', type=int, default=4)
  p.add_argument('--out', required=True)
  p.add_argument('--methods', default='')
  p.add_argument('--size', type=int, default=16)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--num_steps', type=int, default=2)
  p.add_argument('--steps', default='2,4')
  p.add_argument('--workdir')
  p.add_argument('--coordinator_address')
  p.add_argument('--num_processes', type=int)
  p.add_argument('--process_id', type=int)
  args = p.parse_args()
  _setup(args.devices)
  result = {'steps': cmd_steps, 'train': cmd_train, 'first': cmd_first, 'bench': cmd_bench}[args.cmd](args)
  path = args.out + '.json' if args.cmd == 'train' else args.out
  with open(path, 'w') as f:
    json.dump(result, f, default=str)


if __name__ == '__main__':
  main()
