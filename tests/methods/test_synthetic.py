"""Synthetic defects in the U-Net methods' steps (config.synth) and ae_unet's diff_gate='best': what the
U-Net receives is checked against maps computed here (the AE's Flax apply, numpy, scipy's Gaussian), the
masks against the pixels the generator changed, the disabled path against the plain step written out."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from configs import synthetic as synthetic_config
from semiseg import anomalies, augment, evaluate, grid, train
from semiseg.methods import ae_unet, autoencoder, base, synthetic, testing, unet

SIZE = 16


def unet_input_of(step, state, batch, model, **kw):
  """The input ``step`` (a train_step) hands its U-Net, under jit."""
  def run(state, batch):
    spy = testing.Spy(model)
    step(state, batch, model=spy, **kw)
    return spy.inputs[0]
  return np.asarray(jax.jit(run)(state, batch))


def tiny(method, **overrides):
  return testing.shrink(synthetic_config.get_config(f'washer,smoke,method={method}'), image_size=SIZE, batch_size=4,
                        overrides={'synth.enabled': True, 'synth.share': 0.5, **overrides})


def batch_of(stored, seed=1, labeled=2):
  """Labeled and unlabeled images that differ (the unlabeled ones carry the synthetic defects), as the loop
  hands them at batch 4, share 0.5."""
  lab = testing.fixed_batch(('labeled',), stored, labeled, seed=seed)
  unl = testing.fixed_batch(('unlabeled',), stored, 2, seed=seed + 10)
  return {**lab, **unl}


def blur(x_BxHxWxC, sigma):
  """scipy's Gaussian per channel, edges repeated, truncated at 3 sigma (autoencoder.blur's contract)."""
  return scipy.ndimage.gaussian_filter(x_BxHxWxC, (0, sigma, sigma, 0), mode='nearest', truncate=3.0)


def ae_d(ae_params, ae_model, images, sigma, tile=None):
  """|I - AE(I)| blurred, from the AE's Flax apply, tile by tile for textures, in numpy."""
  images = np.asarray(images, np.float32)
  out = np.zeros_like(images)
  t = tile or images.shape[1]
  for y in range(0, images.shape[1], t):
    for x in range(0, images.shape[2], t):
      part = images[:, y:y + t, x:x + t]
      out[:, y:y + t, x:x + t] = blur(np.abs(part - np.asarray(ae_model.apply(ae_params, part))), sigma)
  return out


@pytest.mark.parametrize('key,value,match', [('share', 0.0, 'config.synth.share'), ('share', 1.5, 'config.synth.share'),
                                             ('kinds', 'appearance,scratch', 'config.synth.kinds'),
                                             ('strength', 0.0, 'config.synth.strength')])
def test_bad_synth_values_name_their_key(key, value, match):
  with pytest.raises(ValueError, match=match):
    synthetic.from_config(tiny('unet', **{f'synth.{key}': value}))


def test_the_batch_splits_between_labeled_and_synthetic_images():
  spec = synthetic.from_config(tiny('unet', **{'synth.kinds': 'structure, intensity'}))
  assert (spec.count, spec.labeled, spec.anomaly.kinds) == (2, 2, ('structure', 'intensity'))
  m = testing.create_untrained(tiny('unet'), testing.context(tiny('unet')))
  assert m.streams == ('labeled', 'unlabeled') and m.batch_sizes == {'labeled': 2, 'unlabeled': 2}
  m = testing.create_untrained(tiny('unet', **{'synth.share': 1.0}), testing.context(tiny('unet')))
  assert m.streams == ('unlabeled',) and m.batch_sizes == {'unlabeled': 4}  # zero-label: no labeled stream
  mt = testing.create_untrained(tiny('mean_teacher', unlabeled_batch_size=6), testing.context(tiny('unet')))
  assert mt.batch_sizes == {'labeled': 2, 'unlabeled': 6}  # its defects on the first 2 of its own batch
  with pytest.raises(ValueError, match='config.unlabeled_batch_size'):
    testing.create_untrained(tiny('pi_model', unlabeled_batch_size=1), testing.context(tiny('unet')))
  off = testing.create_untrained(tiny('ae_unet', **{'synth.enabled': False}), testing.context(tiny('unet')))
  assert off.streams == ('labeled',) and off.batch_sizes is None


@pytest.mark.parametrize('texture', [True])  # the object path is the texture's without tiles (1 tile)
def test_the_unet_receives_the_frozen_aes_d_of_each_synthetic_image(texture):
  """ae_unet: D of a synthetic image is the AE's D of that image (not of the clean one), computed in the
  step, tile by tile for a texture's stored 2x image, scaled and gated as a labeled image's, warped (and
  cropped) with image and mask."""
  config = tiny('ae_unet', **{'model.ae_bottleneck': 'conv', 'model.diff_blur': 1.0})
  ctx = base.MethodContext(image_size=SIZE, texture=texture, steps_per_epoch=10)
  method = testing.create_untrained(config, ctx)
  state = testing.init_state(method, jax.random.PRNGKey(0))
  stored = 2 * SIZE if texture else SIZE
  batch = batch_of(stored)
  kw = {**method.train_step.keywords, 'scale': 2.0, 'gate': 1.0}
  got = unet_input_of(ae_unet.train_step, state, batch, **kw)

  key = jax.random.fold_in(state.key, state.step)
  clean = batch['unlabeled']['image'][:2].astype(np.float32) / 255.0
  syn, syn_masks = anomalies.synthesize_batch(jax.random.fold_in(key, synthetic.FOLD), clean, None,
                                              anomalies.AnomalySpec(), 1.0)
  syn = np.asarray(syn)
  assert np.abs(syn - clean).max() > 0.1  # defects were drawn
  ae_params, ae_model, tile = state.extras['ae_params'], autoencoder.create_model(config), SIZE if texture else None
  labeled = batch['labeled']['image'][:2].astype(np.float32) / 255.0
  images = np.concatenate([labeled, syn])
  d = np.concatenate([ae_d(ae_params, ae_model, labeled, 1.0, tile), ae_d(ae_params, ae_model, syn, 1.0, tile)]) / 2.0
  masks = np.concatenate([batch['labeled']['mask'][:2].astype(np.float32), np.asarray(syn_masks)])
  want, _, _ = augment.augment_batch(key, np.concatenate([images, d], -1), masks, method.train_step.keywords['spec'])
  assert got.shape == (4, SIZE, SIZE, 6)
  np.testing.assert_allclose(got, np.asarray(want), atol=2e-5)
  # Not the D of the clean unlabeled image: the defect shows in D.
  d_clean = ae_d(ae_params, ae_model, clean, 1.0, tile) / 2.0
  wrong, _, _ = augment.augment_batch(key, np.concatenate([images, np.concatenate([d[:2], d_clean])], -1), masks,
                                      method.train_step.keywords['spec'])
  assert np.abs(got - np.asarray(wrong)).max() > 1e-3


def test_synthetic_masks_are_the_pixels_changed_and_move_with_the_warp():
  config = tiny('unet')
  ctx = testing.context(config)
  method = testing.create_untrained(config, ctx)
  state = testing.init_state(method, jax.random.PRNGKey(0))
  batch, synth, spec = batch_of(SIZE), method.train_step.keywords['synth'], method.train_step.keywords['spec']
  key = jax.random.fold_in(state.key, state.step)
  images, masks = unet.supervised_batch(state, batch, synth)  # unwarped
  clean = batch['unlabeled']['image'][:2].astype(np.float32) / 255.0
  changed = (np.abs(np.asarray(images)[2:] - clean).max(-1, keepdims=True) > anomalies.AnomalySpec().min_change)
  assert changed.any()
  np.testing.assert_array_equal(np.asarray(masks)[2:], changed.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(masks)[:2], batch['labeled']['mask'][:2].astype(np.float32))
  # After the step's warp: the warped changed pixels (nearest), the labeled masks alike.
  warped_images, warped_masks = unet.augmented_labeled(state, batch, spec, synth)
  _, _, matrices = augment.augment_batch(key, np.asarray(images), None, spec)
  truth = np.concatenate([batch['labeled']['mask'][:2], changed]).astype(np.float32)
  want = augment.warp_batch(truth, matrices, (SIZE, SIZE), 0, 'constant')
  np.testing.assert_array_equal(np.asarray(warped_masks), np.asarray(want))
  assert np.asarray(want)[2:].any()


def test_the_defects_are_a_function_of_the_state_bit_for_bit():
  """Two draws from the same state are equal bit for bit; the next step's key draws other defects."""
  config = tiny('unet')
  method = testing.create_untrained(config, testing.context(config))
  state = testing.init_state(method, jax.random.PRNGKey(0))
  batch, synth, spec = batch_of(SIZE), method.train_step.keywords['synth'], method.train_step.keywords['spec']
  draw = jax.jit(lambda s, b: unet.augmented_labeled(s, b, spec, synth))
  (a, am), (b, bm) = draw(state, batch), draw(state, batch)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(am, bm)
  first = np.asarray(unet.supervised_batch(state, batch, synth)[0])
  later = np.asarray(unet.supervised_batch(state.replace(step=state.step + 1), batch, synth)[0])
  assert np.array_equal(first[:2], later[:2]) and not np.array_equal(first[2:], later[2:])


def test_resume_is_exact_with_synthetic_defects(tmp_path):
  def config(steps):
    c = synthetic_config.get_config(f'washer,smoke,method=unet,num_train_steps={steps}')
    c.synth.enabled, c.ckpt.every_steps = True, 1
    return c
  straight = train.train(config(2), str(tmp_path / 'straight'), progress=False)
  train.train(config(1), str(tmp_path / 'resumed'), progress=False)
  second = train.train(config(2), str(tmp_path / 'resumed'), progress=False)
  assert second.resumed_from == 1
  for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(second.state.params)):
    np.testing.assert_array_equal(a, b)
  assert straight.run.batch_sizes == {'labeled': 2, 'unlabeled': 2}  # smoke batch 4, share 0.5


def _plain_unet_step(state, batch, model, tx, spec):
  """The U-Net step as it was before config.synth existed, written out."""
  images = jnp.asarray(batch['labeled']['image']).astype(jnp.float32) / 255.0
  masks = jnp.asarray(batch['labeled']['mask']).astype(jnp.float32)
  images, masks, _ = augment.augment_batch(jax.random.fold_in(state.key, state.step), images, masks, spec)
  loss, grads = jax.value_and_grad(lambda p: base.sigmoid_bce(model.apply(p, images), masks))(state.params)
  return base.apply_updates(state, grads, tx), loss


def _plain_ae_unet_step(state, batch, model, ae_model, tx, spec, sigma, scale, gate):
  images = jnp.asarray(batch['labeled']['image']).astype(jnp.float32) / 255.0
  diff = jax.lax.stop_gradient(autoencoder.difference(state.extras['ae_params'], images, ae_model, sigma))
  diff = diff * (gate / scale)
  warped, masks, _ = augment.augment_batch(jax.random.fold_in(state.key, state.step),
                                           jnp.concatenate([images, diff], -1),
                                           jnp.asarray(batch['labeled']['mask']).astype(jnp.float32), spec)
  loss, grads = jax.value_and_grad(lambda p: base.sigmoid_bce(model.apply(p, warped), masks))(state.params)
  return base.apply_updates(state, grads, tx), loss


@pytest.mark.parametrize('method_name', ['unet', 'ae_unet'])
def test_synth_disabled_leaves_the_step_as_it_was(method_name):
  config = tiny(method_name, **{'synth.enabled': False, 'model.diff_blur': 1.0})
  method = testing.create_untrained(config, testing.context(config))
  state = testing.init_state(method, jax.random.PRNGKey(0))
  batch = {'labeled': batch_of(SIZE, labeled=4)['labeled']}  # the labeled stream only, as the loop hands it
  kw = method.train_step.keywords
  got, got_metrics = jax.jit(method.train_step)(state, batch)
  if method_name == 'unet':
    plain = jax.jit(functools.partial(_plain_unet_step, model=kw['model'], tx=kw['tx'], spec=kw['spec']))
  else:
    plain = jax.jit(functools.partial(_plain_ae_unet_step, model=kw['model'], ae_model=kw['ae_model'], tx=kw['tx'],
                                      spec=kw['spec'], sigma=kw['sigma'], scale=kw['scale'], gate=kw['gate']))
  want, want_loss = plain(state, batch)
  assert float(got_metrics['loss']) == float(want_loss)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)


def test_zero_label_mode_trains_and_evaluates_a_smoke_run(tmp_path):
  """data.k_labeled=0, synth.share=1.0: ae_unet trains from unlabeled images alone; its gate ranks synthetic
  defects; eval.json has test metrics and no training metrics."""
  config = synthetic_config.get_config('washer,smoke,method=ae_unet')
  config.data.k_labeled, config.synth.enabled, config.synth.share = 0, True, 1.0
  wd = str(tmp_path / 'zero')
  result = train.train(config, wd, progress=False)
  assert len(result.data.labeled) == 0 and result.run.batch_sizes == {'unlabeled': config.batch_size}
  out = evaluate.evaluate_run(result.run, time_it=False)
  saved = json.load(open(os.path.join(wd, 'eval.json')))
  assert saved['train'] is None and saved['num_labeled_images'] == 0
  assert 0.0 <= out['test']['pixel_auroc'] <= 1.0
  if config.model.diff_gate != 'none':
    assert saved['diff_gate']['ranked'] == 'synthetic'
  # Without synthetic defects (or with labeled images asked for) a U-Net has nothing to learn from: the error says so.
  config.synth.share = 0.5
  with pytest.raises(ValueError, match='config.synth.share=1.0'):
    train.train(config, str(tmp_path / 'half'), progress=False)


@pytest.mark.parametrize('d_wins', [True, False])
def test_diff_gate_best_feeds_the_map_that_ranks_better(monkeypatch, d_wins):
  """diff_gate='best': the gate's two AUROCs (monkeypatched: D first, |I - M| second) decide; the U-Net's
  auxiliary channels are then D / p99(D) or blur(|I - M|) / p99(blur(|I - M|)), p99 over the unlabeled
  images, in the score map and in the labeled images' precomputed field alike; the gate stays 1."""
  aurocs = iter([0.9, 0.8] if d_wins else [0.7, 0.8])
  monkeypatch.setattr(ae_unet.metrics, 'pixel_auroc', lambda *a: next(aurocs))
  config = tiny('ae_unet', **{'synth.enabled': False, 'model.diff_gate': 'best', 'model.diff_scale': 'p99',
                              'model.diff_blur': 1.0, 'model.unet_input': 'image+diff'})
  lab = testing.fixed_batch(('labeled',), SIZE, 3, seed=3)['labeled']
  unlabeled = testing.fixed_batch(('unlabeled',), SIZE, 12, seed=4)['unlabeled']['image']
  labeled = type('Labeled', (), {'images': lab['image'], 'masks': lab['mask']})
  ctx = base.MethodContext(image_size=SIZE, texture=False, steps_per_epoch=10, unlabeled=unlabeled, labeled=labeled)
  method = testing.create_untrained(config, ctx)
  info = method.info['diff_gate']
  assert info['rule'] == 'best' and info['open'] == d_wins and info['enters'] == ('D' if d_wins else '|I - M|')
  assert (info['d_auroc_labeled'], info['trivial_auroc_labeled']) == ((0.9, 0.8) if d_wins else (0.7, 0.8))
  assert method.train_step.keywords['gate'] == 1.0
  state = testing.init_state(method, jax.random.PRNGKey(0))
  ae_params, ae_model = state.extras['ae_params'], autoencoder.create_model(config)

  def reference(images_uint8):
    x = images_uint8.astype(np.float32) / 255.0
    if d_wins:
      return ae_d(ae_params, ae_model, x, 1.0)
    mean = unlabeled.astype(np.float64).mean(0) / 255.0
    return blur(np.abs(x - mean).astype(np.float32), 1.0)
  want = reference(lab['image']) / np.percentile(reference(unlabeled), 99)
  spy = testing.Spy(unet.create_model(config))
  method.score_map.func(state, lab['image'].astype(np.float32) / 255.0, **{**method.score_map.keywords, 'model': spy})
  np.testing.assert_allclose(np.asarray(spy.inputs[0])[..., 3:], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(method.stream_fields['labeled']['diff'](lab['image']), want, rtol=1e-4, atol=1e-5)


def test_mean_difference_meets_each_tile_of_a_texture_with_its_tile_of_m():
  rng = np.random.default_rng(0)
  x, mean = rng.random((2, 2 * SIZE, 2 * SIZE, 3)).astype(np.float32), rng.random((2 * SIZE, 2 * SIZE, 3)).astype(np.float32)
  got = ae_unet.mean_difference(augment.to_tiles(x, SIZE), mean, 0.0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(augment.to_tiles(np.abs(x - mean), SIZE)), atol=1e-7)


def test_synth_is_read_by_the_unet_family_only():
  """A synth change makes the U-Net methods' grid cells stale and keeps the AE's, PCA's and AnoGAN's."""
  base_config = synthetic_config.get_config('washer,smoke')
  for method, moves in (('ae', False), ('pca', False), ('anogan', False), ('unet', True), ('ae_unet', True),
                        ('pi_model', True), ('mean_teacher', True)):
    a = base_config.copy_and_resolve_references()
    a.method = method
    b = a.copy_and_resolve_references()
    b.synth.enabled = True
    assert (grid.fingerprint(a) != grid.fingerprint(b)) == moves, method
