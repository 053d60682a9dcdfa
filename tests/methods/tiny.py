"""Tiny methods shared by the tests of tests/methods/: one compiled train step per method for the session."""

import functools

import jax

from configs import synthetic
from semiseg.methods import base, testing

SIZE = 16


def tiny_config(method, **overrides):
  return testing.shrink(synthetic.get_config(f'washer,smoke,method={method}'), image_size=SIZE, batch_size=4,
                        overrides=overrides)


def ctx(texture=False):
  return base.MethodContext(image_size=SIZE, texture=texture, steps_per_epoch=10)


def fixed_batch(seed=0, size=SIZE):
  return testing.fixed_batch(('labeled', 'unlabeled'), size, 4, seed)


@functools.lru_cache(maxsize=None)
def make(method):
  """(method, fresh state, jitted train step): built once per method, whichever test file asks first."""
  tiny = testing.create_tiny(synthetic.get_config(f'washer,smoke,method={method}'), image_size=SIZE, batch_size=4)
  return tiny.method, tiny.state, jax.jit(tiny.method.train_step)


def fit_one_batch(method, metric='loss', steps=12):
  """(method, state, batch, losses): ``steps`` train steps on one fixed batch from a fresh state, and the
  ``metric`` each reported."""
  m, state, step = make(method)
  batch = fixed_batch()
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics[metric]))
  return m, state, batch, losses
