"""Shared fixtures: tiny configs; compiled steps are cached per test module."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TQDM_DISABLE', '1')

import pytest  # noqa: E402


@pytest.fixture
def smoke_config():
  from configs import synthetic
  return synthetic.get_config('washer,smoke')
