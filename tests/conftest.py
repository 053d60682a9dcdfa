"""Shared fixtures: tiny configs; compiled steps are cached per test module."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TQDM_DISABLE', '1')

import pytest  # noqa: E402


def pytest_configure(config):
  # JIT compilation dominates the suite: a persistent cache lets identical programs (the same tiny
  # step in several tests and subprocesses) compile once.
  import jax
  cache = os.environ.setdefault('SEMISEG_TEST_JAX_CACHE', '/tmp/semiseg-test-jax-cache')
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


@pytest.fixture
def smoke_config():
  from configs import synthetic
  return synthetic.get_config('washer,smoke')


@pytest.fixture(scope='session', autouse=True)
def tfds_data_dir(tmp_path_factory):
  """One TFDS data dir for the whole session, so each tiny dataset is built once."""
  if 'SEMISEG_DATA_DIR' not in os.environ or os.environ.get('CI'):
    os.environ['SEMISEG_DATA_DIR'] = str(tmp_path_factory.mktemp('tfds'))
  return os.environ['SEMISEG_DATA_DIR']




_EXIT_STATUS = {}


def pytest_sessionfinish(session, exitstatus):
  _EXIT_STATUS['status'] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  # The damaged-checkpoint tests leave Orbax/TensorStore coroutines and event loops behind that
  # report their (expected) read errors again during interpreter shutdown, after pytest's summary
  # line, which must stay the last thing printed. The summary is out: end the process here.
  if 'status' in _EXIT_STATUS:
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS['status'])
