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
from PIL import Image

from configs import synthetic
from semiseg import evaluate, predict, restore, train
from semiseg.methods import ae_unet, autoencoder, create_method, unet


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
  config = synthetic.get_config('washer,smoke')  # ae_unet: trains its AE first in <workdir>/ae
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
    in_training = [x for (x,) in seen]
    seen.clear()
    restored = restore.restore_trained(config, wd)  # as experiments.evaluate does: the AE from <workdir>/ae
    evaluate.evaluate(*restored, config, time_it=False)
    jax.effects_barrier()
    in_evaluation = np.concatenate([x for (x,) in seen])
  # The AE as its own checkpoint holds it, applied here with its Flax model.
  step, ae_params = restore_params(os.path.join(wd, 'ae'))
  assert step == config.ae_num_train_steps
  ae_model = autoencoder.create_model(config)

  def difference(params, images):
    return np.abs(images - np.asarray(ae_model.apply(params, images)))
  assert len(in_training) == config.num_train_steps
  for inputs in in_training:  # [B, H, W, 6]: the augmented image, then D
    assert inputs.shape == (config.batch_size, 32, 32, 6)
    np.testing.assert_allclose(inputs[..., 3:], difference(ae_params, inputs[..., :3]), atol=1e-5)
  test_images = result.data.test.images.astype(np.float32) / 255.0
  rows = [int(np.argmin(np.abs(in_evaluation[..., :3] - image).max(axis=(1, 2, 3)))) for image in test_images]
  np.testing.assert_allclose(in_evaluation[rows, ..., :3], test_images, atol=1e-6)  # every test image, as is
  np.testing.assert_allclose(in_evaluation[rows, ..., 3:], difference(ae_params, test_images), atol=1e-5)
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

  def spy(state, batch, spec):
    images, masks = real(state, batch, spec)
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
