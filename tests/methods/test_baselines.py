"""The paper's baselines (pca, anogan, pi_model, mean_teacher) against numpy SVD, hand EMAs and exact warps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from semiseg import augment
from semiseg.methods import anogan, base, consistency, create_method, testing
from tests.methods.test_steps import SIZE, fixed_batch


def tiny_config(method, **overrides):
  return testing.shrink(synthetic.get_config(f'washer,smoke,method={method}'), image_size=SIZE, batch_size=4,
                        overrides=overrides)


def ctx(texture=False):
  return base.MethodContext(image_size=SIZE, texture=texture, steps_per_epoch=10)


def pca_images(n=12, size=SIZE, seed=0):
  """uint8 images with a few strong shared patterns plus noise, like a product photographed n times."""
  rng = np.random.default_rng(seed)
  patterns = rng.random((4, size * size * 3))
  coef = rng.normal(size=(n, 4)) * np.array([1.0, 0.5, 0.25, 0.1])
  x = 0.5 + 0.15 * coef @ (patterns - 0.5) + 0.03 * rng.normal(size=(n, size * size * 3))
  return (np.clip(x, 0, 1) * 255).round().astype(np.uint8).reshape(n, size, size, 3)


@functools.lru_cache(maxsize=None)
def fitted_pca(num_components, variance=0.95, texture=False):
  m = create_method(tiny_config('pca', **{'pca.num_components': num_components, 'pca.variance': variance}),
                    ctx(texture))
  images = pca_images(12, 2 * SIZE if texture else SIZE)
  state = jax.jit(m.solve)(m.init(jax.random.PRNGKey(0)), jnp.asarray(images))
  return m, state, images


def numpy_pca(data_NxD, k):
  mean = data_NxD.mean(0)
  _, s, vt = np.linalg.svd(data_NxD - mean, full_matrices=False)
  return mean, vt[:k], s


def test_pca_with_all_components_reconstructs_its_training_images():
  m, state, images = fitted_pca(12)
  assert int(state.step) == 1
  x = images.astype(np.float32) / 255
  np.testing.assert_allclose(m.reconstruct(state, jnp.asarray(x)), x, atol=1e-4)


def test_pca_error_map_equals_numpy_svd():
  k = 3
  m, state, images = fitted_pca(k)
  x = images.reshape(len(images), -1).astype(np.float64) / 255
  mean, vt, _ = numpy_pca(x, k)
  assert tiny_config('pca').model.diff_channels == 'max'  # the CPU preset's channel reduction
  for probe in (x, pca_images(5, seed=1).reshape(5, -1).astype(np.float64) / 255):  # train and unseen
    recon = np.clip((probe - mean) @ vt.T @ vt + mean, 0, 1)
    diff = np.abs(probe - recon).reshape(-1, SIZE, SIZE, 3)
    expected = diff.max(-1)
    got = np.asarray(m.score_map(state, jnp.asarray(probe.reshape(-1, SIZE, SIZE, 3), jnp.float32)))
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert got.min() >= 0 and got.max() <= 1


def test_pca_variance_keeps_the_fewest_components_reaching_it():
  m, state, images = fitted_pca(0, 0.9)
  _, _, s = numpy_pca(images.reshape(len(images), -1).astype(np.float64) / 255, 1)
  expected = int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), 0.9) + 1)
  kept = int((np.abs(np.asarray(state.params['components'])).sum(1) > 0).sum())
  assert kept == expected and 1 < kept < 12
  c = np.asarray(state.params['components'])[:kept]
  np.testing.assert_allclose(c @ c.T, np.eye(kept), atol=1e-5)


def test_pca_textures_fit_on_tiles_like_the_tiled_prediction():
  _, state, images = fitted_pca(4, texture=True)
  tiles = augment.to_tiles(jnp.asarray(images, jnp.float32) / 255, SIZE)
  mean, vt, _ = numpy_pca(np.asarray(tiles, np.float64).reshape(len(tiles), -1), 4)
  np.testing.assert_allclose(state.params['mean'], mean, atol=1e-5)
  # Same subspace (the signs of singular vectors are arbitrary): equal projectors.
  c = np.asarray(state.params['components'], np.float64)
  np.testing.assert_allclose(c.T @ c, vt.T @ vt, atol=1e-4)


@functools.lru_cache(maxsize=None)
def make(method):
  tiny = testing.create_tiny(synthetic.get_config(f'washer,smoke,method={method}'), image_size=SIZE, batch_size=4)
  return tiny.method, tiny.state, jax.jit(tiny.method.train_step)


def test_anogan_step_updates_both_players_and_is_finite():
  m, state, step = make('anogan')
  new, metrics = step(state, fixed_batch())
  assert int(new.step) == 1
  assert set(metrics) >= {'loss', 'd_loss', 'g_loss'}
  assert all(np.isfinite(float(v)) for v in metrics.values())
  np.testing.assert_allclose(float(metrics['loss']), float(metrics['d_loss'] + metrics['g_loss']), rtol=1e-6)
  for player in ('g', 'd'):
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params[player], new.params[player])
    assert all(jax.tree.leaves(changed)), f'every {player} parameter should change'


def test_anogan_latent_search_lowers_its_loss_and_scores_in_unit_range():
  m, state, step = make('anogan')
  for _ in range(3):  # a G that is not just its initialization
    state, _ = step(state, fixed_batch())
  image = base.to_float(fixed_batch()['unlabeled']['image'][:2])
  c = tiny_config('anogan')
  search = dict(g_model=m.score_map.keywords['g_model'], d_model=m.score_map.keywords['d_model'],
                latent_dim=c.anogan.latent_dim, learning_rate=0.05, weight=0.1)
  search_fn = jax.jit(lambda s, x, n: anogan.search_latent(s, x, steps=n, **search), static_argnums=2)
  _, before = search_fn(state, image, 0)
  _, after = search_fn(state, image, 30)
  assert np.all(np.asarray(after) < np.asarray(before)), (before, after)
  scores = np.asarray(jax.jit(m.score_map)(state, image))
  assert scores.shape == (2, SIZE, SIZE) and scores.min() >= 0 and scores.max() <= 1


def test_anogan_generator_ema_is_the_true_average_then_exponential_and_is_what_the_search_inverts():
  config = synthetic.get_config('washer,smoke,method=anogan')
  config.anogan.g_ema_decay = 0.6
  tiny = testing.create_tiny(config, image_size=SIZE, batch_size=4)
  step = jax.jit(tiny.method.train_step)
  states = [tiny.state]
  for _ in range(3):
    states.append(step(states[-1], fixed_batch())[0])
  g = [jax.tree.map(np.asarray, st.params['g']) for st in states]
  # Warm-up min(1 - 1/(t + 1), 0.6): 0.5 and 0.6 after steps 1 and 2, then 0.6 (by hand):
  # ema1 = (g0 + g1) / 2, ema2 = 0.6 ema1 + 0.4 g2, ema3 = 0.6 ema2 + 0.4 g3.
  ema1 = jax.tree.map(lambda a, b: (a + b) / 2, g[0], g[1])
  ema2 = jax.tree.map(lambda e, b: 0.6 * e + 0.4 * b, ema1, g[2])
  ema3 = jax.tree.map(lambda e, b: 0.6 * e + 0.4 * b, ema2, g[3])
  for want, st in ((g[0], states[0]), (ema1, states[1]), (ema3, states[3])):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(st.extras['g_ema'])):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert any(bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(g[3]), jax.tree.leaves(ema3)))
  # The score map reads the EMA generator: erasing the trained one changes nothing, erasing the EMA does.
  image = base.to_float(fixed_batch()['unlabeled']['image'][:2])
  score = jax.jit(tiny.method.score_map)
  last = states[-1]
  no_g = last.replace(params={**last.params, 'g': jax.tree.map(jnp.zeros_like, last.params['g'])})
  no_ema = last.replace(extras={'g_ema': jax.tree.map(jnp.zeros_like, last.extras['g_ema'])})
  np.testing.assert_array_equal(np.asarray(score(no_g, image)), np.asarray(score(last, image)))
  assert not np.allclose(np.asarray(score(no_ema, image)), np.asarray(score(last, image)))


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
  # where it is not negligible (here w * c is ~5e-8 of the loss), in test_consistency.py.
  np.testing.assert_allclose(float(metrics['consistency_weight']), c.weight * np.exp(-5.0), rtol=1e-5)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new.params)
  assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize('method', ['pi_model', 'mean_teacher'])
def test_semi_supervised_overfits_one_batch(method):
  m, state, step = make(method)
  batch = fixed_batch()
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics['ce']))
  assert losses[-1] < losses[0], losses
  probs = np.asarray(jax.jit(m.score_map)(state, base.to_float(batch['labeled']['image'])))
  assert probs.shape == (4, SIZE, SIZE) and probs.min() >= 0 and probs.max() <= 1


def test_rampup_is_the_sigmoid_schedule():
  w = [float(consistency.rampup_weight(jnp.asarray(s), 2.0, 10)) for s in (0, 5, 10, 20)]
  np.testing.assert_allclose(w, [2 * np.exp(-5), 2 * np.exp(-5 * 0.25), 2.0, 2.0], rtol=1e-6)
  assert float(consistency.rampup_weight(jnp.asarray(0), 2.0, 0)) == 2.0


def test_mean_teacher_is_the_ema_of_the_student():
  m, state, step = make('mean_teacher')
  ema_decay = tiny_config('mean_teacher').consistency.ema_decay
  expected = jax.tree.map(np.asarray, state.params)  # the teacher starts as a copy of the student
  np.testing.assert_array_equal(jax.tree.leaves(state.extras['teacher'])[0], jax.tree.leaves(expected)[0])
  # The reference code's warm-up, by hand: after the k-th update (k = 1, 2, ...) the decay is
  # min(1 - 1/(k + 1), ema_decay): 0.5, 0.667, 0.75, ... until it reaches ema_decay.
  for k, seed in enumerate(range(3), start=1):
    state, metrics = step(state, fixed_batch(seed))
    d = min(1.0 - 1.0 / (k + 1), ema_decay)
    np.testing.assert_allclose(float(metrics['ema_decay']), d, rtol=1e-6)
    expected = jax.tree.map(lambda t, s: d * t + (1 - d) * np.asarray(s), expected, state.params)
  for got, want in zip(jax.tree.leaves(state.extras['teacher']), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # the score map is the teacher's, not the student's.
  x = base.to_float(fixed_batch()['labeled']['image'])
  teacher_only = state.replace(params=jax.tree.map(jnp.zeros_like, state.params))
  np.testing.assert_allclose(m.score_map(teacher_only, x), m.score_map(state, x), atol=1e-6)


@pytest.mark.parametrize('key,value,method', [
    ('pca.num_components', -1, 'pca'), ('pca.variance', 1.5, 'pca'),
    ('anogan.features', (8, 16, 32, 64, 128), 'anogan'), ('anogan.search_steps', -1, 'anogan'),
    ('anogan.g_ema_decay', 1.0, 'anogan'),
    ('consistency.ema_decay', 1.0, 'mean_teacher'), ('consistency.rampup_steps', -1, 'pi_model')])
def test_bad_config_values_name_their_key(key, value, method):
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    create_method(tiny_config(method, **{key: value}), ctx())


# pca: the closed-form path; mean_teacher: two streams and extras in the checkpoint. anogan and pi_model
# go through the same paths (one stream / two streams without extras); left out to keep the file fast.
@pytest.mark.parametrize('method', ['pca', 'mean_teacher'])
def test_trains_resumes_and_evaluates_through_the_loop(method, tmp_path):
  from semiseg import evaluate, train
  config = synthetic.get_config(f'washer,smoke,method={method},num_train_steps=2')
  first = train.train(config, str(tmp_path), progress=False)
  again = train.train(config, str(tmp_path), progress=False)  # restores the state, extras included
  assert again.resumed_from == int(first.state.step) == (1 if method == 'pca' else 2)
  for a, b in zip(jax.tree.leaves(first.state), jax.tree.leaves(again.state)):
    np.testing.assert_array_equal(a, b)
  out = evaluate.evaluate(again.method, again.state, again.data, again.ctx, again.mesh, config, time_it=False)
  assert 0.0 <= out['test']['defect_iou'] <= 1.0 and 0.0 <= out['test']['pixel_auroc'] <= 1.0
  assert ('oracle' in out) == (method in ('pca', 'anogan'))
