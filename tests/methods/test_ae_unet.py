"""ae_unet: the frozen autoencoder, its declared prerequisite, the U-Net's input modes and the difference gate."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semiseg import methods
from semiseg.methods import ae_unet, autoencoder, base, testing
from tests.methods.tiny import SIZE, fixed_batch, make, tiny_config


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
