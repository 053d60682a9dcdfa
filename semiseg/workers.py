"""Local workers of a sharded grid: N processes on one host, each running one shard, each pinned to its
own device (semiseg/reproduce.py waits for them and writes the report).

Pinning, by the platform the host's jax finds (asked in a short subprocess, so that this process never
holds an accelerator the workers need):
  gpu: worker i sees GPU i mod G alone (CUDA_VISIBLE_DEVICES); with more workers than GPUs they share,
       each preallocating its share of the memory (XLA_PYTHON_CLIENT_MEM_FRACTION).
  tpu: worker i sees chip i mod C alone (TPU_VISIBLE_CHIPS, one-chip process bounds, its own port).
  cpu: the cores this process may use are split into N disjoint sets. A worker starts unpinned, so that
       XLA's CPU client sizes its thread pool as in a run of one process (by the cores it may use): the
       pool's size decides how a convolution's sums are split, and so the last bits of a cell's numbers.
       Once its backend has started, the worker pins every thread to its own cores (pin_threads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time

CORES_ENV = 'SEMISEG_WORKER_CORES'  # a CPU worker's cores, comma-separated (pin_threads)


@dataclasses.dataclass
class Worker:
  index: int
  shard: str  # 'i/n'
  env: dict[str, str]  # variables set on top of this process's environment
  cores: tuple[int, ...] | None  # CPU affinity, None: inherited
  log_path: str


def probe_platform() -> tuple[str, int]:
  """(platform, local device count) of jax on this host, asked in a subprocess."""
  code = 'import jax, json; print(json.dumps([jax.default_backend(), jax.local_device_count()]))'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  platform, count = json.loads(out.stdout.strip().splitlines()[-1])
  return platform, int(count)


def plan_workers(n: int, platform: str, num_devices: int, log_dir: str, cores: list[int] | None = None,
                 shard_offset: int = 0, num_shards: int | None = None) -> list[Worker]:
  """N workers; worker i runs shard shard_offset + i of num_shards (default N), pinned as above."""
  num_shards = num_shards or n
  cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
  out = []
  for i in range(n):
    env, pinned = {}, None
    if platform == 'gpu':
      env['CUDA_VISIBLE_DEVICES'] = str(i % num_devices)
      share = -(-n // num_devices)  # workers per GPU
      if share > 1:
        env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{0.9 / share:.2f}'
    elif platform == 'tpu':
      env.update(TPU_VISIBLE_CHIPS=str(i % num_devices), TPU_CHIPS_PER_PROCESS_BOUNDS='1,1,1',
                 TPU_PROCESS_BOUNDS='1,1,1', TPU_PROCESS_PORT=str(8476 + i))
    else:
      per = max(1, len(cores) // n)
      pinned = tuple(cores[(i * per) % len(cores):(i * per) % len(cores) + per])
      env[CORES_ENV] = ','.join(map(str, pinned))
    out.append(Worker(i, f'{shard_offset + i}/{num_shards}', env, pinned,
                      os.path.join(log_dir, f'worker{shard_offset + i}.log')))
  return out


def run_workers(workers: list[Worker], command: list[str]) -> dict[int, int]:
  """Starts ``command + ['--config.shard=i/n', '--config.workers=1']`` once per worker, its output in
  its log file; waits for all; {worker index: exit code}. Ctrl-C stops them all."""
  procs = {}
  try:
    for w in workers:
      os.makedirs(os.path.dirname(w.log_path), exist_ok=True)
      log = open(w.log_path, 'w')  # pylint: disable=consider-using-with
      procs[w.index] = (subprocess.Popen(  # pylint: disable=consider-using-with
          command + [f'--config.shard={w.shard}', '--config.workers=1'], stdout=log, stderr=subprocess.STDOUT,
          env={**os.environ, **w.env}), log)
    while any(p.poll() is None for p, _ in procs.values()):
      time.sleep(1.0)
  finally:
    for p, log in procs.values():
      if p.poll() is None:
        p.terminate()
        p.wait()
      log.close()
  return {i: p.returncode for i, (p, _) in procs.items()}


def pin_threads() -> None:
  """In a CPU worker (CORES_ENV set), once its backend has started: every thread of this process, and
  so every thread they start, on the worker's own cores."""
  cores = os.environ.get(CORES_ENV)
  if not cores:
    return
  cpus = {int(c) for c in cores.split(',')}
  for tid in os.listdir('/proc/self/task'):
    with contextlib.suppress(OSError):  # a thread that ended meanwhile
      os.sched_setaffinity(int(tid), cpus)


def strip_layout_flags(argv: list[str]) -> list[str]:
  """A command line's arguments without its --config.shard and --config.workers (the workers get theirs)."""
  drop = ('--config.shard', '--config.workers')
  args, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    if a in drop:  # '--config.shard 0/2'
      skip = True
      continue
    if not a.startswith(tuple(d + '=' for d in drop)):
      args.append(a)
  return args
