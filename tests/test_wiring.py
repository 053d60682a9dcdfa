"""The paper's wiring end to end through the loop, each part checked against a computation made here:
AE + U-Net feeds its U-Net |I - AE(I)| of the *trained* AE, in training and in evaluation (paper 3.2);
textures train on random crops of the 2x stored images, are evaluated as tiles stitched back and
predicted at the stored size (paper 3.3).

The U-Net's inputs are recorded with ``jax.debug.callback`` from inside the jitted steps and score maps,
so what is checked is what the compiled programs computed.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.ndimage
from PIL import Image

from configs import synthetic
from semiseg import evaluate, predict, restore, train
from semiseg.methods import ae_unet, autoencoder, create_method, testing, unet


def record(seen: list, *arrays) -> None:
  """Appends the concrete values of ``arrays`` to ``seen`` when the (jitted) program runs."""
  jax.debug.callback(lambda *xs: seen.append(tuple(np.asarray(x) for x in xs)), *arrays)


def restore_params(workdir: str):
  """(step, params) of the latest checkpoint in ``workdir``, read with Orbax directly."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'ckpt'))
  try:
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  finally:
    manager.close()
  return step, state['params']


def test_ae_unet_feeds_the_unet_the_difference_image_of_the_trained_ae(tmp_path):
  # ae_unet: trains its AE first in <workdir>/ae. The U-Net trains on D of the stored labeled images,
  # computed once by the loop (warped with its image step by step: checked below); D divided by its
  # 99th percentile over the unlabeled images (the CPU preset's diff_scale='p99'). A 4-step AE's D does not
  # beat |I - M| on the labeled images, so the CPU preset's gate is opened by hand (diff_gate='none').
  config = synthetic.get_config('washer,smoke,model.diff_gate=none')
  assert config.model.diff_scale == 'p99'
  wd = str(tmp_path / 'run')
  seen = []
  real = ae_unet.unet_input

  def spy(*args, **kwargs):
    out = real(*args, **kwargs)
    record(seen, out)
    return out
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ae_unet, 'unet_input', spy)
    result = train.train(config, wd, progress=False)
    jax.effects_barrier()
    seen.clear()
    restored = restore.restore_trained(config, wd)  # as experiments.evaluate does: the AE from <workdir>/ae
    evaluate.evaluate_run(restored, time_it=False)
    jax.effects_barrier()
    in_evaluation = np.concatenate([x for (x,) in seen])
  # The AE as its own checkpoint holds it, applied here with its Flax model.
  step, ae_params = restore_params(os.path.join(wd, 'ae'))
  assert step == config.ae_num_train_steps
  ae_model = autoencoder.create_model(config)

  def difference(params, images):  # |I - AE(I)| with the preset's Gaussian blur, by scipy
    raw = np.abs(images - np.asarray(ae_model.apply(params, images)))
    return scipy.ndimage.gaussian_filter(raw, (0, config.model.diff_blur, config.model.diff_blur, 0),
                                         mode='nearest', truncate=3.0)
  unlabeled = result.data.unlabeled.images.astype(np.float32) / 255.0
  p99 = np.percentile(difference(ae_params, unlabeled), 99)
  labeled = result.data.labeled.images
  # The D the loop hands every batch (the trained run's own AE arrays were donated to its steps: the
  # restored method's are the same).
  handed = restored.method.stream_fields['labeled']['diff'](labeled)
  np.testing.assert_allclose(handed, difference(ae_params, labeled.astype(np.float32) / 255.0) / p99, atol=1e-4)
  test_images = result.data.test.images.astype(np.float32) / 255.0
  rows = [int(np.argmin(np.abs(in_evaluation[..., :3] - image).max(axis=(1, 2, 3)))) for image in test_images]
  np.testing.assert_allclose(in_evaluation[rows, ..., :3], test_images, atol=1e-6)  # every test image, as is
  np.testing.assert_allclose(in_evaluation[rows, ..., 3:], difference(ae_params, test_images) / p99, atol=1e-4)
  # The check tells the trained AE from the untrained one and from zeros.
  ae_config = ae_unet.ae_config(config)
  initial = create_method(ae_config, result.ctx).init(jax.random.PRNGKey(config.seed)).params
  gap = np.abs(difference(ae_params, test_images) - difference(initial, test_images)).max()
  assert gap > 1e-3 and difference(ae_params, test_images).max() > 1e-2, gap


def test_textures_train_on_crops_evaluate_as_stitched_tiles_and_predict_at_the_stored_size(tmp_path):
  # No warp: the crop is then an exact window of the stored image (augment.py), so it can be found.
  config = synthetic.get_config('brick,smoke,method=unet,augment.enabled=false')
  size, stored = config.data.image_size, 2 * config.data.image_size
  wd = str(tmp_path / 'run')
  seen = []
  real = unet.augmented_labeled

  def spy(state, batch, spec, synth=None):
    images, masks = real(state, batch, spec, synth)
    record(seen, batch['labeled']['image'], images)
    return images, masks
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(unet, 'augmented_labeled', spy)
    result = train.train(config, wd, progress=False)
    jax.effects_barrier()
  data = result.data
  assert data.texture and {s.images.shape[1:3] for s in (data.unlabeled, data.labeled, data.test)} == {
      (stored, stored)}
  # Training: each step sees crop-size windows of the 2x images, at random corners.
  assert len(seen) == config.num_train_steps
  corners = set()
  for raw, crops in seen:
    assert raw.shape[1:3] == (stored, stored) and crops.shape[1:3] == (size, size)
    for image, crop in zip(raw.astype(np.float32) / 255.0, crops):
      found = [(y, x) for y in range(stored - size + 1) for x in range(stored - size + 1)
               if np.allclose(image[y:y + size, x:x + size], crop, atol=1e-6)]
      assert found, 'a training input that is no window of its stored image'
      corners.add(found[0])
  assert len(corners) > 4, corners
  # Evaluation: every test image as (stored/size)^2 tiles, each scored alone here and stitched.
  held = {}
  ev = evaluate.evaluate(result.method, result.state, data, result.ctx, result.mesh, config, time_it=False,
                         score_sink=held.__setitem__)
  assert ev['test_tiles_per_image'] == 4 and held['test'].shape == (len(data.test), stored, stored)
  score_map = jax.jit(result.method.score_map)
  first = data.test.images[:2].astype(np.float32) / 255.0
  stitched = np.zeros(first.shape[:3], np.float32)
  for y in range(0, stored, size):
    for x in range(0, stored, size):
      stitched[:, y:y + size, x:x + size] = score_map(result.state, first[:, y:y + size, x:x + size])
  np.testing.assert_allclose(held['test'][:2], stitched, atol=1e-5)
  # Prediction: an image at the stored size gets the same tiled score map at that size; another size
  # gets its own size back.
  os.makedirs(tmp_path / 'in')
  Image.fromarray(data.test.images[0]).save(tmp_path / 'in' / 'stored.png')
  Image.fromarray(data.test.images[1][:40, :56]).save(tmp_path / 'in' / 'other.png')
  predict.predict(config, wd, str(tmp_path / 'in'), str(tmp_path / 'out'), progress=False)
  score = np.asarray(Image.open(tmp_path / 'out' / 'stored_score.png'), np.float64) / 65535
  assert score.shape == (stored, stored)
  np.testing.assert_allclose(score, stitched[0], atol=1.5 / 65535 + 1e-5)
  assert Image.open(tmp_path / 'out' / 'other_score.png').size == (56, 40)


@pytest.mark.parametrize('texture', [False, True])
def test_the_unet_trains_on_the_warped_difference_image_of_the_stored_image(texture):
  """The U-Net trains on W(I) and W(|I - AE(I)|), D taken of the stored image (textures: tile by tile,
  as evaluation does), not |W(I) - AE(W(I))|. Checked against D computed
  here with the AE's Flax model and the project's warp (tested against scipy in test_augment.py)."""
  from semiseg import augment
  from semiseg.methods import base, testing
  size = 16
  config = testing.shrink(synthetic.get_config('washer,smoke,method=ae_unet'), image_size=size, batch_size=3,
                          overrides={'model.ae_bottleneck': 'conv',
                                     'model.diff_blur': 1.0})
  ctx = base.MethodContext(image_size=size, texture=texture, steps_per_epoch=10)
  method = testing.create_untrained(config, ctx)
  state = testing.init_state(method, jax.random.PRNGKey(0))
  stored = 2 * size if texture else size
  batch = testing.fixed_batch(('labeled',), stored, 3, seed=1)
  ae_params, ae_model = state.extras['ae_params'], autoencoder.create_model(config)
  spy = testing.Spy(unet.create_model(config))
  tx = base.optimizer_from_config(config, ctx)
  spec = base.augment_spec(config, ctx)
  kwargs = dict(model=spy, ae_model=ae_model, tx=tx, spec=spec, mode='image+diff', sigma=1.0,
                tile=size if texture else None)
  ae_unet.train_step(state, batch, **kwargs)
  got_stored = np.asarray(spy.inputs[0])

  images = batch['labeled']['image'].astype(np.float32) / 255.0
  if texture:  # four tiles of the 2x image, each through the AE on its own
    diff = np.zeros_like(images)
    for y in range(0, stored, size):
      for x in range(0, stored, size):
        tile = images[:, y:y + size, x:x + size]
        diff[:, y:y + size, x:x + size] = np.asarray(autoencoder.difference(ae_params, tile, ae_model, 1.0))
  else:
    diff = np.asarray(autoencoder.difference(ae_params, images, ae_model, 1.0))
  key = base.step_key(state)
  want, _, _ = augment.augment_batch(key, np.concatenate([images, diff], -1), None, spec)
  assert got_stored.shape == (3, size, size, 6)
  np.testing.assert_allclose(got_stored, np.asarray(want), atol=1e-5)
  # Not D of the warped view: the AE would see a rotated, shifted image.
  warped_d = np.asarray(autoencoder.difference(ae_params, np.asarray(want)[..., :3], ae_model, 1.0))
  assert np.abs(got_stored[..., 3:] - warped_d).max() > 1e-3

  # The loop computes D of the stored labeled images once (Method.stream_fields) and hands it with the
  # batch: the step then feeds the U-Net the same input without running the AE.
  from semiseg import sharding
  from semiseg.data import pipeline
  labeled = pipeline.Split(images=batch['labeled']['image'], masks=batch['labeled']['mask'],
                           defect_types=['scratch'] * 3, filenames=['a', 'b', 'c'])
  data = pipeline.CategoryData(unlabeled=labeled, labeled=labeled, test=labeled, manifest={}, texture=texture,
                               image_size=size)
  config.data.prefetch = 0
  loop_batch = next(train._batches(method, config, data, 0, sharding.create_mesh()))
  rows = [list(map(bytes, batch['labeled']['image'])).index(bytes(x)) for x in np.asarray(loop_batch['labeled']['image'])]
  np.testing.assert_allclose(np.asarray(loop_batch['labeled']['diff']), diff[rows], atol=1e-5)
  ae_unet.train_step(state, {'labeled': {**batch['labeled'], 'diff': diff}}, **kwargs)
  np.testing.assert_allclose(np.asarray(spy.inputs[1]), got_stored, atol=1e-5)
  ae_unet.train_step(state, {'labeled': {**batch['labeled'], 'diff': np.zeros_like(diff)}},
                     **kwargs)  # the handed D is what the U-Net gets: no AE run in the step
  assert np.abs(np.asarray(spy.inputs[2])[..., 3:]).max() == 0


def test_diff_scale_p99_divides_d_by_its_99th_percentile_over_the_unlabeled_images():
  """config.model.diff_scale='p99': D reaches the U-Net (training and score map) divided by the 99th
  percentile of D over the context's unlabeled images, computed here with numpy."""
  from semiseg.methods import base, testing
  size = 16
  config = testing.shrink(synthetic.get_config('washer,smoke,method=ae_unet'), image_size=size, batch_size=3,
                          overrides={'model.diff_scale': 'p99'})
  unlabeled = testing.fixed_batch(('unlabeled',), size, 40, seed=2)['unlabeled']['image']
  ctx = base.MethodContext(image_size=size, texture=False, steps_per_epoch=10, unlabeled=unlabeled)
  method = testing.create_untrained(config, ctx)
  state = testing.init_state(method, jax.random.PRNGKey(0))
  ae_params, ae_model = state.extras['ae_params'], autoencoder.create_model(config)
  sigma = config.model.diff_blur
  d_unlabeled = np.asarray(autoencoder.difference(ae_params, unlabeled.astype(np.float32) / 255.0, ae_model, sigma))
  p99 = np.percentile(d_unlabeled, 99)
  assert p99 > 1e-3
  spy = testing.Spy(unet.create_model(config))
  images = testing.fixed_batch(('labeled',), size, 3, seed=3)['labeled']['image'].astype(np.float32) / 255.0
  method.score_map.func(state, images, **{**method.score_map.keywords, 'model': spy})
  d = np.asarray(autoencoder.difference(ae_params, images, ae_model, sigma))
  np.testing.assert_allclose(np.asarray(spy.inputs[0])[..., 3:], d / p99, rtol=1e-4, atol=1e-6)
  assert method.train_step.keywords['scale'] == pytest.approx(p99, rel=1e-5)
  # Without data (a test or benchmark context) D is not scaled, and nothing fails.
  plain = testing.create_untrained(config, base.MethodContext(image_size=size, texture=False, steps_per_epoch=10))
  assert plain.train_step.keywords['scale'] == 1.0
