"""semiseg: semi-supervised defect segmentation in JAX; sets the XLA flags the project relies on.

Importing ``semiseg`` (before jax creates its first backend) appends these to ``XLA_FLAGS``; a flag
the user already set, with any value, is left as the user set it:

  --xla_cpu_experimental_ynn_fusion_type=-individual_convolution
      XLA:CPU (jaxlib 0.10) hands every convolution to YNNPACK by default. YNNPACK's forward
      convolution is fine, but its weight gradient of a 3x3 convolution (a convolution with an HxW
      "kernel" over the batch) is about half the speed of XLA's own Eigen convolution, and that is
      where a U-Net train step spends its time. Measured on a 2-core CPU (side by side, noisy shared
      machine): that weight gradient at 256 px, 2 x 64 -> 64 channels 732 -> 356 ms; the U-Net step
      (6 -> 1 channels, Adam) at 128 px, 16 features, batch 8 0.80 -> 0.58 s; at 256 px, 64 features,
      batch 2 17.7 -> 8.6 s (experiments/benchmark.py has the current figures).
      Same math (fp32, no reduced precision); only which library computes the convolution changes.
      CPU-only: GPU and TPU compilers ignore it.

The flag must exist in the installed jaxlib (XLA aborts on unknown flags), so it is added only for
the jaxlib versions it was checked against (0.10.x), read from package metadata without importing
jaxlib. ``SEMISEG_XLA_FLAGS=0`` in the environment turns this off. If jax already initialised a
backend before ``semiseg`` was imported, the flags cannot take effect and a warning says so.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings

# (flag, value, jaxlib (major, minor) versions where the flag is known to exist).
_XLA_FLAGS: tuple[tuple[str, str, tuple[tuple[int, int], ...]], ...] = (
    ('--xla_cpu_experimental_ynn_fusion_type', '-individual_convolution', ((0, 10),)),
)


def _jaxlib_version() -> tuple[int, int] | None:
  try:
    major, minor = importlib.metadata.version('jaxlib').split('.')[:2]
    return int(major), int(minor)
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return None


def _backend_started() -> bool:
  bridge = sys.modules.get('jax._src.xla_bridge')
  return bool(getattr(bridge, '_backends', None))


def project_xla_flags() -> list[str]:
  """The flags of _XLA_FLAGS that apply to the installed jaxlib, as ``--name=value`` strings."""
  version = _jaxlib_version()
  return [f'{name}={value}' for name, value, versions in _XLA_FLAGS if version in versions]


def _set_xla_flags() -> None:
  if os.environ.get('SEMISEG_XLA_FLAGS', '1').lower() in ('0', 'off', 'false', 'no'):
    return
  current = os.environ.get('XLA_FLAGS', '')
  present = {f.split('=', 1)[0] for f in current.split()}
  missing = [f for f in project_xla_flags() if f.split('=', 1)[0] not in present]
  if not missing:
    return
  if _backend_started():
    warnings.warn(f'semiseg was imported after jax started a backend, so XLA_FLAGS {missing} are not '
                  'in effect (CPU train steps are slower); import semiseg before using jax.', stacklevel=3)
    return
  os.environ['XLA_FLAGS'] = ' '.join([current] + missing).strip() if current else ' '.join(missing)


_set_xla_flags()
