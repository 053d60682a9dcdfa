"""Shared fixtures: tiny configs; compiled steps are cached per test module.

Nothing a test runs reads the developer's own data or caches (``~/tensorflow_datasets``, ``~/.cache``)
or leaves files in the system temp dir: the TFDS data dir is the session's ``tmp_path``, and the
caches the tests share with their subprocesses (XLA compilations, matplotlib's font list, PyTorch's
compiled kernels in the benchmark tests) live in pytest's cache folder (``.pytest_cache/d/``), kept
between runs of the suite.
"""

import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TQDM_DISABLE', '1')
# Subprocesses (python -m experiments.train, -c, the multi-host worker) import the installed package as
# the tests do (pyproject.toml: importlib mode, README: python -P): no working directory or script
# folder in front of sys.path.
os.environ['PYTHONSAFEPATH'] = '1'

import pytest  # noqa: E402

_OWN_TEMP = []  # cache folders made here when pytest's cache is off (-p no:cacheprovider), removed at the end


def _cache_dir(config, name: str) -> str:
  cache = getattr(config, 'cache', None)
  if cache is not None:
    return str(cache.mkdir(name))
  _OWN_TEMP.append(tempfile.mkdtemp(prefix=f'semiseg-test-{name}-'))
  return _OWN_TEMP[-1]


def pytest_configure(config):
  # JIT compilation dominates the suite: a persistent cache lets identical programs (the same tiny
  # step in several tests and subprocesses) compile once. Entry points run by the tests use it too
  # (SEMISEG_JAX_CACHE), instead of the user's ~/.cache/semiseg/jax.
  import jax
  cache = os.environ.setdefault('SEMISEG_TEST_JAX_CACHE', _cache_dir(config, 'jax'))
  os.environ['SEMISEG_JAX_CACHE'] = cache
  os.environ.setdefault('MPLCONFIGDIR', _cache_dir(config, 'matplotlib'))  # not ~/.config, ~/.cache
  os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', _cache_dir(config, 'torchinductor'))  # not $TMPDIR
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


@pytest.fixture
def smoke_config():
  from configs import synthetic
  return synthetic.get_config('washer,smoke')


@pytest.fixture(scope='session', autouse=True)
def tfds_data_dir(tmp_path_factory):
  """One TFDS data dir for the whole session, so each tiny dataset is built once; never the user's
  own (a SEMISEG_DATA_DIR set in the environment is ignored here)."""
  os.environ['SEMISEG_DATA_DIR'] = str(tmp_path_factory.mktemp('tfds'))
  return os.environ['SEMISEG_DATA_DIR']


_EXIT_STATUS = {}


def pytest_sessionfinish(session, exitstatus):
  _EXIT_STATUS['status'] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  for folder in _OWN_TEMP:
    shutil.rmtree(folder, ignore_errors=True)
  # The damaged-checkpoint tests leave Orbax/TensorStore coroutines and event loops behind that
  # report their (expected) read errors again during interpreter shutdown, after pytest's summary
  # line, which must stay the last thing printed. The summary is out: end the process here. Every
  # temporary folder is gone by now (pytest's own basetemp by its retention policy, pyproject.toml),
  # so skipping the interpreter's exit handlers leaves nothing behind.
  if 'status' in _EXIT_STATUS:
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS['status'])
