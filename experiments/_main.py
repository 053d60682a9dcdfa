"""What every entry point shares: the --config/--workdir/multi-host flags and the start-up line."""

from __future__ import annotations

import difflib
import logging
import os

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags(workdir_required: bool = True) -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/synthetic.py:brick.',
                                  lock_config=True)
  _name_unknown_overrides(FLAGS['config'])
  flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics, reports.',
                      required=workdir_required)
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: address:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')
  flags.mark_flags_as_required(['config'])


def _name_unknown_overrides(flag) -> None:
  """``--config.nope=1`` ends in a bare ``AttributeError: "'nope'"`` traceback inside ml_collections;
  turn it into absl's one-line flag error that names the key, the keys there and a close match."""
  parse = flag._parse

  def checked(argument):
    try:
      return parse(argument)
    except (KeyError, AttributeError) as e:
      raise flags.IllegalFlagValueError(_unknown_override_message(flag, argument)
                                        or f'flag --{flag.name}: {type(e).__name__}: {e}') from None

  flag._parse = checked


def _unknown_override_message(flag, argument) -> str | None:
  try:  # private ml_collections API: on any surprise fall back to the original error text
    config = flag.parser.parse(argument)
    overrides = flag._GetOverrides(flag._GetArgv())
  except Exception:  # pylint: disable=broad-except
    return None
  for path in overrides:
    node, parts = config, path.split('.')
    for i, part in enumerate(parts):
      where = 'config.' + '.'.join(parts[:i]) if i else 'config'
      if not hasattr(node, 'keys'):
        return f'flag --{flag.name}.{path}: {where} is a {type(node).__name__} value, not a group of keys.'
      keys = list(node.keys())
      if part in keys:
        node = node[part]
        continue
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f' Did you mean --config.{".".join(parts[:i] + close)}?' if close else ''
      return (f'flag --{flag.name}.{path}: {where} has no key {part!r} (its keys: {", ".join(sorted(keys))}).'
              f'{hint}')
  return None


def start() -> None:
  """Multi-host start when asked for, logging, one line of process/devices.

  Several processes (one per host, or one per GPU) start with ``--coordinator_address=host0:port
  --num_processes=N --process_id=i``, or with ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID``, or under SLURM / Open MPI with nothing added (``semiseg.sharding``).
  """
  from semiseg import sharding
  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax
  # Persistent compilation cache: a rerun or resume of the same config skips XLA compilation.
  cache = os.environ.get('SEMISEG_JAX_CACHE', os.path.expanduser('~/.cache/semiseg/jax'))
  if cache and cache.lower() not in ('0', 'off', 'none'):
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  # Only process 0 logs progress; the others report warnings and errors.
  level = logging.INFO if jax.process_index() == 0 else logging.WARNING
  logging.basicConfig(level=level, format=f'%(asctime)s p{jax.process_index()} %(levelname)s %(name)s: %(message)s')
  logging.getLogger().setLevel(level)  # also when absl installed its handler first
  logging.getLogger('absl').setLevel(logging.WARNING)
  for noisy in ('orbax', 'orbax.checkpoint', 'jax._src', 'absl'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.info('process %d/%d, %d local / %d global devices: %s', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
