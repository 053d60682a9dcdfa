"""Files a run writes: atomic writes (temporary file in the same folder + rename), JSON, the workdir lock,
the run record (run_info.json). Named so that it does not shadow the standard library's ``io``."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from typing import Any, Iterator


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` so that a kill leaves either the old file or the new one, never half."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  write_bytes_atomic(path, text.encode('utf-8'))


def write_json_atomic(path: str, obj: Any) -> None:
  write_text_atomic(path, to_json(obj, indent=2) + '\n')


def to_json(obj: Any, indent: int | None = None) -> str:
  """Strict JSON (RFC 8259) of ``obj``: a float that is not finite (an undefined metric such as the
  image AUROC of one defect type, NaN; a threshold no score reaches, inf) is written as ``null``, never
  as the bare ``NaN`` / ``Infinity`` that ``jq``, browsers and most JSON readers reject. Numpy arrays and
  scalars become lists and numbers; other unknown objects their ``str``. Readers take null as NaN
  where a number is expected (semiseg/report.py)."""
  return json.dumps(finite_or_null(obj), indent=indent, sort_keys=True, allow_nan=False, default=str)


def finite_or_null(x: Any) -> Any:
  """``x`` with every non-finite float replaced by None, recursively through dicts, lists, tuples,
  sets and numpy values (``tolist``)."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: finite_or_null(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, set)):
    return [finite_or_null(v) for v in x]
  if hasattr(x, 'tolist') and not isinstance(x, (str, bytes)):
    return finite_or_null(x.tolist())
  return x


def read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); delete it to have it written again.') from e


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds ``workdir/.lock`` for the run; a second run on the same workdir stops with a clear error."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, '.lock')
  f = open(path, 'a+')
  try:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise RuntimeError(f'Another run is using the workdir {workdir} (it holds {path}). Wait for it '
                           'to finish, stop it, or choose another --workdir.') from None
      raise
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    yield
  finally:
    with contextlib.suppress(OSError):
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    f.close()


def git_commit() -> str | None:
  """The commit of the checkout the package comes from (an editable install), else of the one the run
  started in (a wheel installed from it: site-packages is no git tree); None outside a checkout."""
  for folder in (os.path.dirname(os.path.abspath(__file__)), os.getcwd()):
    try:
      commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=5,
                              cwd=folder).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
      commit = None
    if commit:
      return commit
  return None


def run_info(config) -> dict:
  """The resolved config, package versions, git commit and devices of a run."""
  import jax
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'tensorflow_datasets', 'numpy',
               'ml_collections', 'skimage'):
    try:
      module = __import__(name, fromlist=['__version__'])
      versions[name] = getattr(module, '__version__', 'unknown')
    except ImportError:
      versions[name] = None
  commit = git_commit()
  return {
      'config': json.loads(config.to_json_best_effort()),
      'versions': versions, 'python': sys.version.split()[0], 'platform': platform.platform(),
      'git_commit': commit,
      'devices': [str(d) for d in jax.devices()], 'process_count': jax.process_count(),
  }
