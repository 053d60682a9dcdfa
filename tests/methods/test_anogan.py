"""anogan: both players' step, the latent search, and the generator EMA against a hand-computed average."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import synthetic
from semiseg.methods import anogan, base, testing
from tests.methods.tiny import SIZE, fixed_batch, make, tiny_config


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
