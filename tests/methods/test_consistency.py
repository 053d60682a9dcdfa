"""The consistency term of pi_model and mean_teacher past its ramp-up, where it is not negligible: its part
of the loss (numpy by hand) and of the gradients (jax.grad of a loss written out by hand), both methods.

The two views are the image and its transpose: they disagree (the U-Net is not transpose-equivariant), and
the warp between them is exact on the pixel grid, so the reference needs no resampling: view 2's map in
view 1's frame is p2 transposed, valid on rows and columns 2..13 of 16 (at least 1.5 px inside the image).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from semiseg.methods import base, consistency, testing, unet

SIZE = 16
VALID = slice(2, SIZE - 2)  # valid_region(identity, margin=1.5): 1.5 <= row, col <= 13.5


def transposed_views(key, images_BxHxWx3, spec):
  """(v1, v2, M1, M2): the image itself and its transpose; M2 swaps (row, col), v2(o) = x(M2 o)."""
  del key, spec
  b = images_BxHxWx3.shape[0]
  eye = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (b, 3, 3))
  swap = jnp.broadcast_to(jnp.asarray([[0, 1, 0], [1, 0, 0], [0, 0, 1]], jnp.float32), (b, 3, 3))
  return images_BxHxWx3, images_BxHxWx3.transpose(0, 2, 1, 3), eye, swap


def spread(params, noise_seed=None):
  """A fresh U-Net predicts its prior (0.01) almost everywhere, where two views agree to ~1e-4: its head
  unbiased and 5x steeper, it predicts over the whole range (mean ~0.4, std ~0.25); ``noise_seed``: noise
  of half each leaf's scale added too (another model)."""
  params = jax.tree.map(jnp.asarray, params)
  if noise_seed is not None:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(noise_seed), len(leaves))
    params = treedef.unflatten([p + 0.5 * jax.random.normal(k, p.shape, p.dtype) * max(float(jnp.std(p)), 0.1)
                                for p, k in zip(leaves, keys)])
  head = params['params']['head']
  params['params']['head'] = {'bias': jnp.zeros_like(head['bias']), 'kernel': 5.0 * head['kernel']}
  return params


@functools.lru_cache(maxsize=None)
def setup(method):
  tiny = testing.create_tiny(synthetic.get_config(f'washer,smoke,method={method}'), image_size=SIZE, batch_size=4)
  c = tiny.config.consistency
  params = spread(tiny.state.params)
  state = tiny.state.replace(step=jnp.asarray(c.rampup_steps + 3, tiny.state.step.dtype), params=params)
  if method == 'mean_teacher':  # a teacher that differs from the student
    state = state.replace(extras={'teacher': spread(tiny.state.params, 2)})
  batch = {'labeled': tiny.batch['labeled'], 'unlabeled': testing.fixed_batch(('unlabeled',), SIZE, 4, 7)['unlabeled']}
  return tiny, state, batch


def step_with_grads(method, monkeypatch):
  """The method's step with two_views giving the transposed views and the update replaced by the
  gradients themselves (state.params <- grads), so that they can be read off exactly."""
  tiny, state, batch = setup(method)
  monkeypatch.setattr(consistency, 'two_views', transposed_views)
  monkeypatch.setattr(base, 'apply_updates', lambda state, grads, tx, **kw: state.replace(
      step=state.step + 1, params=grads, **kw))
  new, metrics = jax.jit(tiny.method.train_step)(state, batch)
  return tiny, state, batch, new.params, metrics


def by_hand(method, tiny, state, batch, weight):
  """(loss, ce, consistency) in float64 numpy from the model's outputs, and the gradient of the same
  loss written in jnp, for consistency weight ``weight``."""
  kw = tiny.method.train_step.keywords
  model = kw['model']
  images, masks = unet.augmented_labeled(state, batch, kw['spec'])  # the labeled warp, as the step draws it
  x = base.to_float(batch['unlabeled']['image'])
  x_t = x.transpose(0, 2, 1, 3)
  view2_params = state.extras['teacher'] if method == 'mean_teacher' else None

  def loss_fn(params, xp=jnp):
    z = model.apply(params, images).astype(jnp.float32)
    y = masks
    p1 = jax.nn.sigmoid(model.apply(params, x).astype(jnp.float32))
    p2 = jax.nn.sigmoid(model.apply(view2_params or params, x_t).astype(jnp.float32))
    if xp is np:
      z, y, p1, p2 = (np.asarray(a, np.float64) for a in (z, y, p1, p2))
    else:
      p2 = p2 if view2_params is None else jax.lax.stop_gradient(p2)
    ce = xp.mean(xp.logaddexp(0.0, z) - z * y)  # -y log s(z) - (1 - y) log(1 - s(z)); smooth at z = 0
    c = xp.mean(xp.square(p1 - p2.transpose(0, 2, 1, 3))[:, VALID, VALID])
    return ce + weight * c, ce, c

  loss, ce, c = loss_fn(state.params, np)
  grads = jax.grad(lambda p: loss_fn(p)[0])(state.params)
  return (loss, ce, c), grads


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize('method', ['pi_model', 'mean_teacher'])
def test_consistency_term_in_loss_and_gradients_past_rampup(method, monkeypatch):
  tiny, state, batch, grads, metrics = step_with_grads(method, monkeypatch)
  weight = tiny.config.consistency.weight
  assert weight > 0 and int(state.step) > tiny.config.consistency.rampup_steps
  np.testing.assert_allclose(float(metrics['consistency_weight']), weight, rtol=1e-6)  # ramped up
  (loss, ce, c), want_grads = by_hand(method, tiny, state, batch, weight)
  assert weight * c > 0.05 * ce, (weight * c, ce)  # the term matters here
  np.testing.assert_allclose(float(metrics['ce']), ce, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['consistency']), c, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['loss']), loss, rtol=1e-4)
  # The gradients: those of ce + weight * c, visibly not those of ce alone.
  got, want = flat(grads), flat(want_grads)
  _, ce_only = by_hand(method, tiny, state, batch, 0.0)
  term = want - flat(ce_only)
  assert np.linalg.norm(term) > 0.1 * np.linalg.norm(want), (np.linalg.norm(term), np.linalg.norm(want))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
  assert np.linalg.norm(got - want) < 0.01 * np.linalg.norm(term)
