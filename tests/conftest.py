"""Shared fixtures: tiny configs; compiled steps are cached per test module; the subprocess work of
the slowest module fixtures starts with the session, beside the in-process tests (``Background``).

Nothing a test runs reads the developer's own data or caches (``~/tensorflow_datasets``, ``~/.cache``)
or leaves files in the system temp dir: the TFDS data dir is the session's ``tmp_path``, and the
caches the tests share with their subprocesses (XLA compilations, matplotlib's font list, PyTorch's
compiled kernels in the benchmark tests) live in pytest's cache folder (``.pytest_cache/d/``), kept
between runs of the suite.
"""

import concurrent.futures
import os
import shutil
import subprocess
import tempfile
import threading

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


@pytest.fixture
def replace_unet_loss(monkeypatch):
  """``replace_unet_loss(loss_fn)`` makes unet's train step report ``loss_fn(state_before, state_after,
  loss)`` as its loss (a NaN at a chosen step, a loss that tracks the step)."""
  import dataclasses
  from semiseg.methods import unet
  create = unet.create

  def replace(loss_fn):
    def create_with_loss(config, ctx):
      method = create(config, ctx)
      step = method.train_step

      def replaced(state, batch):
        new, metrics = step(state, batch)
        return new, {**metrics, 'loss': loss_fn(state, new, metrics['loss'])}
      return dataclasses.replace(method, train_step=replaced)
    monkeypatch.setattr(unet, 'create', create_with_loss)
  return replace


@pytest.fixture(scope='session', autouse=True)
def tfds_data_dir(tmp_path_factory):
  """One TFDS data dir for the whole session, so each tiny dataset is built once; never the user's
  own (a SEMISEG_DATA_DIR set in the environment is ignored here)."""
  os.environ['SEMISEG_DATA_DIR'] = str(tmp_path_factory.mktemp('tfds'))
  return os.environ['SEMISEG_DATA_DIR']


NICENESS = 10  # of the background children


class Background:
  """The subprocess work of a few module fixtures, started when the session starts.

  The suite keeps about one core busy (its user + sys time was its wall time, on 2 cores): the tests
  run one at a time and XLA compiles a program on one thread. A test module names such work in
  ``BACKGROUND_JOBS = {fixture_name: job}``: ``job(tmp_path_factory, background)`` runs on the main
  thread when the session starts (folders, datasets; nothing that compiles) and returns a callable that
  starts the children (``popen``, ``run``) and reads their answers. One thread runs those callables one
  after another, in the order their fixtures are first needed, on the core the in-process tests leave
  idle; the fixture waits for its job's result (``result``), or runs the job itself where the session
  did not start it.
  """

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='background')
    self._futures: dict[str, concurrent.futures.Future] = {}
    self._procs: list[subprocess.Popen] = []
    self._lock = threading.Lock()
    self._closed = False
    self.env = dict(os.environ)  # the children's, unless given: never a test's monkeypatched environment

  def submit(self, name: str, job, tmp_path_factory) -> None:
    if name in self._futures:
      return
    try:
      self._futures[name] = self._pool.submit(job(tmp_path_factory, self))
    except Exception as e:  # noqa: BLE001 - its fixture raises it, not every test of the session
      self._futures[name] = concurrent.futures.Future()
      self._futures[name].set_exception(e)

  def result(self, name: str, job, tmp_path_factory):
    future = self._futures.get(name)
    return job(tmp_path_factory, self)() if future is None else future.result()

  def popen(self, args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen at a lower priority (``nice``: the in-process tests, which the session waits
    for, keep their core); a child still running when the session ends (a failed or stopped run) is
    killed."""
    nice = [shutil.which('nice'), '-n', str(NICENESS)] if shutil.which('nice') else []
    with self._lock:
      if self._closed:
        raise RuntimeError('the session has ended')
      proc = subprocess.Popen(nice + list(args), **{'env': self.env, **kwargs})
      self._procs.append(proc)
    return proc

  def run(self, args, *, timeout: float, capture_output: bool = True, text: bool = True,
          **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(args, capture_output=True, text=True, timeout=...) through ``popen``."""
    assert capture_output and text
    proc = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.communicate()
      raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

  def close(self) -> None:
    for future in self._futures.values():
      future.cancel()
    with self._lock:
      self._closed = True
      for proc in self._procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope='session', autouse=True)
def background(request, tmp_path_factory, tfds_data_dir):
  """The session's Background, its jobs started for the fixtures the selected tests use."""
  del tfds_data_dir  # set first: the jobs' children read the session's datasets
  jobs = Background()
  for item in request.session.items:  # job fixture names are unique across the test modules
    for name, job in getattr(getattr(item, 'module', None), 'BACKGROUND_JOBS', {}).items():
      if name in getattr(item, 'fixturenames', ()):
        jobs.submit(name, job, tmp_path_factory)
  yield jobs
  jobs.close()


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
