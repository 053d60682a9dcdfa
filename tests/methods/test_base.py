"""The Method record's contract, for every method through one test: the train step (STYLE.md's checks on a
tiny model and a fixed batch), the staircase optimizer, config errors naming their key, and a run through
the training loop that resumes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from semiseg import methods
from semiseg.methods import base, create_method, testing
from tests.methods.tiny import SIZE, ctx, fit_one_batch, fixed_batch, make, tiny_config

METHODS = ['ae', 'unet', 'ae_unet']


@pytest.mark.parametrize('method', METHODS)
def test_step_advances_changes_params_and_is_finite(method):
  m, state, step = make(method)
  new, metrics = step(state, fixed_batch())
  assert int(new.step) == int(state.step) + 1
  assert np.isfinite(float(metrics['loss']))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new.params)
  assert all(jax.tree.leaves(changed)), 'every parameter should receive a gradient update'


@pytest.mark.parametrize('method', METHODS)
def test_overfits_one_batch(method):
  losses = fit_one_batch(method)[-1]
  assert losses[-1] < losses[0], losses


@pytest.mark.parametrize('method', ['unet', 'ae_unet'])
def test_jit_and_no_jit_agree(method):
  m, state, step = make(method)
  batch = fixed_batch(1)
  a_state, a = step(state, batch)
  with jax.disable_jit():
    b_state, b = m.train_step(state, batch)
  np.testing.assert_allclose(float(a['loss']), float(b['loss']), rtol=1e-4)
  for x, y in zip(jax.tree.leaves(a_state.params), jax.tree.leaves(b_state.params)):
    np.testing.assert_allclose(x, y, atol=1e-5)


def applied_learning_rates(tx, num_steps: int) -> np.ndarray:
  """The step size ``tx`` applies at each of ``num_steps`` updates, read off the updates themselves: with
  a constant gradient of 1, Adam's bias-corrected moments are exactly 1 and 1, so its update is
  -lr / (1 + eps): -lr up to float32 rounding (~1e-5 relative)."""
  params = {'w': jnp.zeros((), jnp.float32)}
  grads = {'w': jnp.ones((), jnp.float32)}

  def step(opt_state, _):
    updates, opt_state = tx.update(grads, opt_state, params)
    return opt_state, -updates['w']
  _, lrs = jax.lax.scan(step, tx.init(params), None, length=num_steps)
  return np.asarray(lrs, np.float64)


def test_decay_every_steps_overrides_the_epoch_count():
  """config.optim.decay_every_steps (the CPU preset's 135) sets the staircase in steps, whatever the
  epoch; unset, decay_every_epochs x steps_per_epoch does. Read off the optimizer the method steps with."""
  config = testing.shrink(synthetic.get_config('washer,smoke,method=unet'), image_size=SIZE, learning_rate=1e-3,
                          overrides={'optim.decay_every_steps': 4, 'optim.decay_every_epochs': 30})
  tx = methods.create_method(config, base.MethodContext(image_size=SIZE, texture=False, steps_per_epoch=10)).train_step.keywords['tx']
  np.testing.assert_allclose(applied_learning_rates(tx, 10), [1e-3] * 4 + [0.8e-3] * 4 + [0.64e-3] * 2, rtol=1e-4)
  config.optim.decay_every_steps = None  # 30 epochs of 1 step
  tx = methods.create_method(config, base.MethodContext(image_size=SIZE, texture=False, steps_per_epoch=1)).train_step.keywords['tx']
  np.testing.assert_allclose(applied_learning_rates(tx, 32), [1e-3] * 30 + [0.8e-3] * 2, rtol=1e-4)
  config.optim.decay_every_steps = 0
  with pytest.raises(ValueError, match=r'config\.optim\.decay_every_steps'):
    methods.create_method(config, base.MethodContext(image_size=SIZE, texture=False, steps_per_epoch=1))


def test_learning_rate_is_a_staircase_x08_every_transition():
  lrs = applied_learning_rates(base.create_optimizer(1e-4, 0.8, 30), 66)
  expected = np.array([1e-4] * 30 + [0.8e-4] * 30 + [0.64e-4] * 6)  # by hand: 1e-4 x 0.8^(step // 30)
  np.testing.assert_allclose(lrs, expected, rtol=1e-4)  # float32 moments: ~1e-5
  with pytest.raises(ValueError, match='learning_rate'):
    base.create_optimizer(-1.0, 0.8, 30)


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
