"""What every entry point shares: the --config/--workdir/multi-host flags and the start-up line."""

from __future__ import annotations

import logging
import os

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags(workdir_required: bool = True) -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/synthetic.py:brick.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics, reports.',
                      required=workdir_required)
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: address:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')
  flags.mark_flags_as_required(['config'])


def start() -> None:
  """Multi-host start when asked for, logging, one line of process/devices."""
  from semiseg import sharding
  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax
  # Persistent compilation cache: a rerun or resume of the same config skips XLA compilation.
  cache = os.environ.get('SEMISEG_JAX_CACHE', os.path.expanduser('~/.cache/semiseg/jax'))
  if cache and cache.lower() not in ('0', 'off', 'none'):
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  for noisy in ('orbax', 'orbax.checkpoint', 'jax._src', 'absl'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.info('process %d/%d, %d local / %d global devices: %s', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
