"""A registry method at a tiny size, ready to step: config -> method -> state -> batch, built one way for
the tests, the multi-host worker and the benchmarks.

    tiny = testing.create_tiny(synthetic.get_config('washer,smoke,method=ae_unet'))
    state, metrics = jax.jit(tiny.method.train_step)(tiny.state, tiny.batch)

Declared prerequisites (ae_unet's AE) are freshly initialised, not trained: enough for steps,
shapes, sharding and timing, never for results. Images are objects at ``image_size`` (no texture
crop).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax
import numpy as np

from semiseg import sharding
from semiseg.methods import base, create_method, prerequisites

PREREQUISITE_SEED = 5  # PRNGKey of the initialised (untrained) prerequisites


@dataclasses.dataclass(frozen=True)
class Tiny:
  config: Any  # the shrunk ConfigDict
  ctx: base.MethodContext
  method: base.Method
  state: base.TrainState  # fresh, with the method's extras (a frozen AE) in place
  batch: dict[str, dict[str, np.ndarray]]  # numpy uint8 {stream: {'image', 'mask'}} for method.streams


def shrink(config, *, image_size: int = 16, batch_size: int = 8, dtype: str = 'float32',
           learning_rate: float = 3e-3, overrides: dict[str, Any] | None = None):
  """A copy of ``config`` at ``image_size`` with ``batch_size`` images in each stream, and a learning
  rate that lowers the loss within a dozen steps; ``overrides`` sets dotted keys ('pca.variance')."""
  c = copy.deepcopy(config)
  c.data.image_size = image_size
  c.batch_size = c.unlabeled_batch_size = batch_size
  c.model.dtype = dtype
  c.optim.learning_rate = learning_rate
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def context(config, steps_per_epoch: int = 10) -> base.MethodContext:
  return base.MethodContext(image_size=config.data.image_size, texture=False, steps_per_epoch=steps_per_epoch)


def create_untrained(config, ctx: base.MethodContext) -> base.Method:
  """``config.method``'s Method, each declared prerequisite initialised instead of trained."""
  trained = {}
  for name, req in prerequisites(config).items():
    method = create_untrained(req.config, ctx)
    trained[name] = method.init(jax.random.PRNGKey(PREREQUISITE_SEED))
  return create_method(config, ctx, trained)


def init_state(method: base.Method, key: jax.Array) -> base.TrainState:
  """A fresh state with the method's extras in place, as the loop makes it (unsharded)."""
  state = sharding.compile_run_once(method.init, key)(key)
  return state if method.extras is None else state.replace(extras=method.extras)


def fixed_batch(streams, image_size: int, batch_size: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """Numpy uint8 images with a bright disc each and its mask; every stream gets the same images."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:image_size, :image_size]
  images, masks = [], []
  for _ in range(batch_size):
    cy, cx = rng.integers(4, image_size - 4, 2)
    m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 9).astype(np.uint8)
    img = (rng.random((image_size, image_size, 3)) * 60 + 100).astype(np.uint8)
    img[m.astype(bool)] = 230
    images.append(img)
    masks.append(m[..., None])
  return {s: {'image': np.stack(images), 'mask': np.stack(masks)} for s in streams}


def create_tiny(config, *, image_size: int = 16, batch_size: int = 8, dtype: str = 'float32',
                learning_rate: float = 3e-3, overrides: dict[str, Any] | None = None, seed: int = 0) -> Tiny:
  """``config.method`` shrunk (see ``shrink``), created, with a fresh state (PRNGKey(seed)) and a fixed batch."""
  c = shrink(config, image_size=image_size, batch_size=batch_size, dtype=dtype, learning_rate=learning_rate,
             overrides=overrides)
  ctx = context(c)
  method = create_untrained(c, ctx)
  return Tiny(config=c, ctx=ctx, method=method, state=init_state(method, jax.random.PRNGKey(seed)),
              batch=fixed_batch(method.streams, image_size, batch_size, seed))


class Spy:
  """A model stand-in for a step (e.g. the U-Net of ae_unet): records what it is applied to, then runs
  the real one, so a test reads the input the step hands its network."""

  def __init__(self, model):
    self.model, self.inputs = model, []

  def apply(self, params, x):
    self.inputs.append(x)
    return self.model.apply(params, x)
