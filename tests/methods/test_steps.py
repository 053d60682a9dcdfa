"""Train-step checks per STYLE.md for ae, unet and ae_unet on tiny models and a fixed batch."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from configs import synthetic
from semiseg import methods
from semiseg.methods import ae_unet, autoencoder, base, testing

SIZE = 16


def tiny_config(method):
  return testing.shrink(synthetic.get_config(f'washer,smoke,method={method}'), image_size=SIZE, batch_size=4)


def fixed_batch(seed=0, size=SIZE):
  return testing.fixed_batch(('labeled', 'unlabeled'), size, 4, seed)


@functools.lru_cache(maxsize=None)
def make(method):
  tiny = testing.create_tiny(synthetic.get_config(f'washer,smoke,method={method}'), image_size=SIZE, batch_size=4)
  return tiny.method, tiny.state, jax.jit(tiny.method.train_step)


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
  m, state, step = make(method)
  batch = fixed_batch()
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
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


def test_ae_unet_keeps_the_autoencoder_frozen():
  m, state, step = make('ae_unet')
  ae_params = state.extras['ae_params']
  assert any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(ae_params))  # an AE is in place, not the zeros

  def loss_of_ae(ae):
    return m.train_step(state.replace(extras={**state.extras, 'ae_params': ae}), fixed_batch())[1]['loss']
  loss_and_grad = jax.jit(jax.value_and_grad(loss_of_ae))
  loss, grads = loss_and_grad(ae_params)
  # The U-Net's loss depends on the AE (through D = |I - AE(I)|) ...
  nudged_loss, _ = loss_and_grad(jax.tree.map(lambda x: x * 1.5, ae_params))
  assert abs(float(nudged_loss) - float(loss)) > 1e-6
  # ... but no gradient of it reaches the AE, and a few steps leave the AE's parameters bit for bit.
  assert all(not bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
  new = state
  for _ in range(3):
    new, _ = step(new, fixed_batch())
  for x, y in zip(jax.tree.leaves(state.extras), jax.tree.leaves(new.extras)):
    np.testing.assert_array_equal(x, y)


def test_ae_unet_declares_its_autoencoder_and_needs_it_trained():
  config = tiny_config('ae_unet')
  config.ae_num_train_steps = 3
  req = methods.prerequisites(config)['ae']
  assert (req.config.method, req.config.num_train_steps, req.workdir_key) == ('ae', 3, 'ae_workdir')
  assert req.config.data.image_size == SIZE and config.method == 'ae_unet'  # derived, not changed
  assert methods.prerequisites(tiny_config('unet')) == {}
  ctx = base.MethodContext(image_size=SIZE, texture=False, steps_per_epoch=10)
  with pytest.raises(ValueError, match=r"\['ae'\] trained first"):
    methods.create_method(config, ctx)


def test_ae_unet_input_modes():
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, SIZE, SIZE, 3))
  ae_model = autoencoder.create_model(tiny_config('ae'))
  p = ae_model.init(jax.random.PRNGKey(1), x)
  d = jnp.abs(x - ae_model.apply(p, x))
  np.testing.assert_array_equal(ae_unet.unet_input(x, p, ae_model, 'image'), x)
  np.testing.assert_allclose(ae_unet.unet_input(x, p, ae_model, 'diff'), d, atol=1e-6)
  both = ae_unet.unet_input(x, p, ae_model, 'image+diff')
  assert both.shape[-1] == 6
  np.testing.assert_allclose(both[..., 3:], d, atol=1e-6)


@pytest.mark.parametrize('informative', [True, False])
def test_diff_gate_opens_only_when_d_beats_the_mean_image_on_the_labeled_images(monkeypatch, informative):
  """model.diff_gate='trivial': the gate compares D's labeled pixel AUROC (channel max, as the score map)
  with that of |I - M|, M the unlabeled mean; both checked against scipy's Mann-Whitney U / (n1 n0)."""
  import scipy.stats
  rng = np.random.default_rng(0)
  labeled = types.SimpleNamespace(images=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8),
                                  masks=(rng.random((3, 8, 8, 1)) < 0.2).astype(np.uint8))
  unlabeled = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  noise = rng.random((3, 8, 8, 3)).astype(np.float32)
  d = noise + 2.0 * labeled.masks if informative else noise
  monkeypatch.setattr(ae_unet, 'stored_differences', lambda images, **kw: d)
  config = tiny_config('ae_unet')
  config.model.diff_gate, config.model.diff_channels = 'trivial', 'max'
  ctx = base.MethodContext(image_size=8, texture=False, steps_per_epoch=1, unlabeled=unlabeled, labeled=labeled)
  gate, info = ae_unet.diff_gate(config, ctx, None, None)
  y = labeled.masks[..., 0].reshape(-1).astype(bool)
  def auroc(score):
    s = score.reshape(-1)
    return scipy.stats.mannwhitneyu(s[y], s[~y]).statistic / (y.sum() * (~y).sum())
  trivial = np.abs(labeled.images / 255.0 - unlabeled.mean(axis=0) / 255.0).max(-1)
  np.testing.assert_allclose(info['trivial_auroc_labeled'], auroc(trivial), atol=1e-9)
  np.testing.assert_allclose(info['d_auroc_labeled'], auroc(d.max(-1)), atol=1e-9)
  assert info['open'] == informative and gate == float(informative)
  assert info['open'] == (info['d_auroc_labeled'] > info['trivial_auroc_labeled'])


def test_a_closed_gate_feeds_d_as_zeros():
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, SIZE, SIZE, 3))
  ae_model = autoencoder.create_model(tiny_config('ae'))
  p = ae_model.init(jax.random.PRNGKey(1), x)
  both = ae_unet.unet_input(x, p, ae_model, 'image+diff', gate=0.0)
  np.testing.assert_array_equal(both[..., :3], x)
  assert not np.any(np.asarray(both[..., 3:]))
  config = tiny_config('ae_unet')
  config.model.diff_gate = 'maybe'
  with pytest.raises(ValueError, match='config.model.diff_gate'):
    ae_unet.validate(config)


@pytest.mark.parametrize('unet_input', ['image+diff', 'diff'])
def test_the_gate_decides_only_where_d_is_added_to_the_image(monkeypatch, unet_input):
  """Fed D alone (Table 4's 'diff' ablation) the U-Net keeps it: the gate is not consulted there."""
  consulted = []
  monkeypatch.setattr(ae_unet, 'diff_gate', lambda *a: consulted.append(True) or (1.0, None))
  config = tiny_config('ae_unet')
  config.model.diff_gate, config.model.unet_input = 'trivial', unet_input
  ctx = base.MethodContext(image_size=SIZE, texture=False, steps_per_epoch=1)
  testing.create_untrained(config, ctx)
  assert consulted == ([True] if unet_input == 'image+diff' else [])


@pytest.mark.parametrize('channels', ['mean', 'max'])
def test_ae_score_map_is_channel_reduced_abs_difference(channels):
  """The AE's score: |I - AE(I)| blurred by config.model.diff_blur px (scipy's Gaussian, edges
  repeated, 3 sigma), then its channel mean or max (config.model.diff_channels)."""
  m, state, _ = make('ae')
  sigma = tiny_config('ae').model.diff_blur
  assert sigma > 0  # the CPU preset blurs D
  x = jax.random.uniform(jax.random.PRNGKey(3), (2, SIZE, SIZE, 3))
  raw = np.abs(np.asarray(x) - np.asarray(m.reconstruct(state, x)))
  blurred = scipy.ndimage.gaussian_filter(raw, (0, sigma, sigma, 0), mode='nearest', truncate=3.0)
  want = blurred.max(-1) if channels == 'max' else blurred.mean(-1)
  score_map = functools.partial(autoencoder.score_map, model=autoencoder.create_model(tiny_config('ae')),
                                sigma=sigma, channels=channels)
  np.testing.assert_allclose(score_map(state, x), want, atol=1e-6)
  if channels == tiny_config('ae').model.diff_channels:  # the method's score map follows the config
    np.testing.assert_allclose(m.score_map(state, x), want, atol=1e-6)


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
