"""The consistency term shared by pi_model and mean_teacher: the aligned agreement of two warped views
(exact pixel-grid warps), the ramp-up, both methods' steps, and the term past its ramp-up, where it is not
negligible: its part of the loss (numpy by hand) and of the gradients (jax.grad of a loss written out by
hand), both methods.

Past the ramp-up, the two views are the image and its transpose: they disagree (the U-Net is not
transpose-equivariant), and the warp between them is exact on the pixel grid, so the reference needs no
resampling: view 2's map in view 1's frame is p2 transposed, valid on rows and columns 2..13 of 16 (at
least 1.5 px inside the image).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from semiseg import augment
from semiseg.methods import base, consistency, testing, unet
from tests.methods.tiny import fit_one_batch, fixed_batch, make, tiny_config

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


# Exact pixel-aligned rigid maps (90-degree turns, flips, integer shifts/crops): bilinear reads land on
# pixel centres, so a per-pixel model commutes with the warps exactly.
def integer_matrix(quarter_turns, flip, shift, in_hw, out_hw):
  c_in = (np.array(in_hw) - 1) / 2
  c_out = (np.array(out_hw) - 1) / 2
  a = np.linalg.matrix_power(np.array([[0.0, 1.0], [-1.0, 0.0]]), quarter_turns) @ np.diag([1.0, flip])
  m = np.eye(3)
  m[:2, :2] = a
  m[:2, 2] = c_in + np.array(shift) - a @ c_out  # centre of view -> centre of x + integer shift
  return m.astype(np.float32)


@pytest.mark.parametrize('in_size,shift_range', [(SIZE, 3), (2 * SIZE, 8)])  # objects; texture crops
def test_aligned_consistency_is_zero_for_an_equivariant_model_and_positive_otherwise(in_size, shift_range):
  rng = np.random.default_rng(in_size)
  b, in_hw, out_hw = 6, (in_size, in_size), (SIZE, SIZE)
  draws = [[integer_matrix(rng.integers(4), rng.choice([-1.0, 1.0]), rng.integers(-shift_range, shift_range + 1, 2),
                           in_hw, out_hw) for _ in range(b)] for _ in range(2)]
  m1, m2 = (jnp.asarray(np.stack(d)) for d in draws)
  x = jax.random.uniform(jax.random.PRNGKey(0), (b, *in_hw, 3))
  v1, v2 = (augment.warp_batch(x, m, out_hw, 1, 'constant') for m in (m1, m2))

  def per_pixel(v):  # a fixed function of each pixel's own values: exactly equivariant
    return jax.nn.sigmoid(4.0 * v[..., :1] - 2.0 + v[..., 1:2])

  def positional(v):  # depends on where the pixel sits in the view: not equivariant
    rows = jnp.arange(v.shape[1], dtype=jnp.float32)[None, :, None, None] / v.shape[1]
    return jax.nn.sigmoid(4.0 * v[..., :1] - 2.0 + 3.0 * rows)

  _, valid = consistency.align_to_view1(per_pixel(v2), m1, m2, in_hw)
  assert float(valid.mean()) > 0.2
  zero = consistency.aligned_consistency(per_pixel(v1), per_pixel(v2), m1, m2, in_hw)
  assert float(zero) < 1e-12
  assert float(consistency.aligned_consistency(positional(v1), positional(v2), m1, m2, in_hw)) > 1e-3


@pytest.mark.parametrize('texture', [False, True])
def test_valid_region_reads_only_pixels_that_saw_the_image(texture):
  """Independent check of the derived mask with random rotations: push 'this pixel read x' (warp of
  ones, zero outside) through both warps; wherever the mask says valid, it must be exactly 1."""
  spec = augment.AugmentSpec(max_rotation_deg=30.0, max_translate=0.15, crop_size=SIZE if texture else None)
  in_hw = (2 * SIZE, 2 * SIZE) if texture else (SIZE, SIZE)
  ones = jnp.ones((32, *in_hw, 1))
  _, _, m1 = augment.augment_batch(jax.random.PRNGKey(1), ones, None, spec)
  _, _, m2 = augment.augment_batch(jax.random.PRNGKey(2), ones, None, spec)
  out_hw = (SIZE, SIZE)
  # Coverage: 1 where every bilinear neighbour lay inside x; less where the zero border leaked in.
  cov1 = augment.warp_batch(ones, m1, out_hw, 1, 'constant')
  cov2 = augment.warp_batch(ones, m2, out_hw, 1, 'constant')
  cov2_in_1, valid = consistency.align_to_view1(cov2, m1, m2, in_hw)
  v = np.asarray(valid, bool)
  assert 0.2 < v.mean() < 1.0
  # valid_region accepts points up to 1e-3 px past an edge (float slack of composed matrices), where
  # the bilinear weight of the outside neighbour is at most 1e-3: that is the tolerance.
  np.testing.assert_allclose(np.asarray(cov1)[v], 1.0, atol=1.01e-3)
  np.testing.assert_allclose(np.asarray(cov2_in_1)[v], 1.0, atol=1.01e-3)
  assert np.mean(np.asarray(cov2_in_1)[v] == 1.0) > 0.99
  assert np.asarray(cov2_in_1)[~v].min() < 0.99  # the mask is needed: outside it the border leaks in


@pytest.mark.parametrize('method', ['pi_model', 'mean_teacher'])
def test_semi_supervised_step_advances_and_is_finite(method):
  m, state, step = make(method)
  new, metrics = step(state, fixed_batch())
  assert int(new.step) == 1
  extra = {'ema_decay'} if method == 'mean_teacher' else set()
  assert set(metrics) == {'loss', 'ce', 'consistency', 'consistency_weight'} | extra
  assert all(np.isfinite(float(v)) for v in metrics.values())
  c = tiny_config(method).consistency
  # Step 0: the ramp-up's start. The term's part of the loss and gradients is checked past the ramp-up,
  # where it is not negligible (here w * c is ~5e-8 of the loss), in
  # test_consistency_term_in_loss_and_gradients_past_rampup.
  np.testing.assert_allclose(float(metrics['consistency_weight']), c.weight * np.exp(-5.0), rtol=1e-5)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new.params)
  assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize('method', ['pi_model', 'mean_teacher'])
def test_semi_supervised_overfits_one_batch(method):
  m, state, batch, losses = fit_one_batch(method, 'ce')
  assert losses[-1] < losses[0], losses
  probs = np.asarray(jax.jit(m.score_map)(state, base.to_float(batch['labeled']['image'])))
  assert probs.shape == (4, SIZE, SIZE) and probs.min() >= 0 and probs.max() <= 1


def test_rampup_is_the_sigmoid_schedule():
  w = [float(consistency.rampup_weight(jnp.asarray(s), 2.0, 10)) for s in (0, 5, 10, 20)]
  np.testing.assert_allclose(w, [2 * np.exp(-5), 2 * np.exp(-5 * 0.25), 2.0, 2.0], rtol=1e-6)
  assert float(consistency.rampup_weight(jnp.asarray(0), 2.0, 0)) == 2.0
