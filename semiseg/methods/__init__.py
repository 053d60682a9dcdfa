"""The method registry, in the paper's order (Table 2's columns): a new method is one file and one line here."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

# name -> module path. Each module has ``create(config, ctx) -> Method``, optionally ``validate(config)``
# (values its models cannot take) and ``prerequisites(config)`` (methods to train first; then it is
# ``create(config, ctx, trained)``, see base.Prerequisite).
REGISTRY = {
    'pca': 'semiseg.methods.pca',
    'anogan': 'semiseg.methods.anogan',
    'ae': 'semiseg.methods.autoencoder',
    'unet': 'semiseg.methods.unet',
    'pi_model': 'semiseg.methods.pi_model',
    'mean_teacher': 'semiseg.methods.mean_teacher',
    'ae_unet': 'semiseg.methods.ae_unet',
}
METHODS = tuple(REGISTRY)  # the paper's order


def paper_order(names: Iterable[str]) -> list[str]:
  """``names`` without repeats: registry methods in the paper's order, then any others sorted."""
  names = set(names)
  return [m for m in METHODS if m in names] + sorted(names - set(METHODS))


def _module(config):
  if config.method not in REGISTRY:
    raise ValueError(f'config.method={config.method!r} is not a known method; choose one of '
                     f'{sorted(REGISTRY)}.')
  return importlib.import_module(REGISTRY[config.method])


def validate_method(config) -> None:
  """Runs the method module's ``validate(config)`` (values its models cannot take), if it has one."""
  validate = getattr(_module(config), 'validate', None)
  if validate is not None:
    validate(config)


def prerequisites(config) -> dict:
  """{name: base.Prerequisite} that ``config.method`` needs trained before it is created; mostly empty."""
  declare = getattr(_module(config), 'prerequisites', None)
  return {} if declare is None else declare(config)


def create_method(config, ctx, trained: dict | None = None):
  """Builds the method named by ``config.method``; ``trained`` holds its finished prerequisites."""
  needs = prerequisites(config)
  if not needs:
    return _module(config).create(config, ctx)
  missing = sorted(set(needs) - set(trained or {}))
  if missing:
    raise ValueError(f'{config.method} needs {missing} trained first; semiseg.train.train trains them, '
                     'semiseg.restore.restore_trained restores them.')
  return _module(config).create(config, ctx, {name: trained[name] for name in needs})
