"""Evaluation: an anomaly-score threshold is fitted on the labeled images and never sees a test mask; the
test-fitted one is reported only as the oracle; eval.json is strict JSON."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from semiseg import curves, evaluate, sharding
from semiseg.data import pipeline
from semiseg.methods import base
from tests import test_fileio

SIZE = 16


def brightness(state, images_BxHxWx3):
  """An anomaly score map that needs no training: the pixel's mean brightness, in [0, 1]."""
  del state
  return images_BxHxWx3.mean(axis=-1)


METHOD = base.Method(name='brightness', streams=('unlabeled',), init=lambda key: None, score_map=brightness,
                     score_kind='anomaly')


def split(images, masks, types) -> pipeline.Split:
  return pipeline.Split(images=images, masks=masks[..., None].astype(np.uint8), defect_types=list(types),
                        filenames=[f'{t}/{i:03d}.png' for i, t in enumerate(types)])


def images_with_spots(rng, n, levels):
  """``n`` noisy grey images (~100) with one 4x4 spot per entry of ``levels`` (its grey value), and
  each spot's mask per level."""
  images = rng.integers(90, 110, (n, SIZE, SIZE, 3)).astype(np.uint8)
  masks = {level: np.zeros((n, SIZE, SIZE), bool) for level in levels}
  for i in range(n):
    for k, level in enumerate(levels):
      y, x = 2 + 6 * k, int(rng.integers(0, SIZE - 4))
      images[i, y:y + 4, x:x + 4] = level
      masks[level][i, y:y + 4, x:x + 4] = True
  return images, masks


def category(test_masks: np.ndarray, labeled, test_images) -> pipeline.CategoryData:
  n = len(test_images)
  types = ['scratch'] * n
  empty = split(np.zeros((0, SIZE, SIZE, 3), np.uint8), np.zeros((0, SIZE, SIZE), bool), [])
  return pipeline.CategoryData(unlabeled=empty, labeled=labeled, test=split(test_images, test_masks, types),
                               manifest={}, texture=False, image_size=SIZE)


@pytest.fixture(scope='module')
def run():
  rng = np.random.default_rng(0)
  # Labeled images: a bright defect (200) and a faint non-defect spot (150). Test images: the same two
  # spots, labeled two ways: only the bright one a defect, or both.
  lab_images, lab = images_with_spots(rng, 3, (200, 150))
  labeled = split(lab_images, lab[200], ['scratch'] * 3)
  test_images, test = images_with_spots(rng, 6, (200, 150))
  config = synthetic.get_config('washer,smoke')
  assert config.threshold_rule == 'labeled'
  mesh = sharding.create_mesh()
  ctx = base.MethodContext(image_size=SIZE, texture=False, steps_per_epoch=1)

  def evaluate_with(test_masks, workdir=None):
    return evaluate.evaluate(METHOD, None, category(test_masks, labeled, test_images), ctx, mesh, config,
                             workdir=workdir, time_it=False)
  return evaluate_with, labeled, test, lab_images


def test_the_threshold_never_sees_the_test_masks(run):
  evaluate_with, labeled, test, lab_images = run
  bright_only = evaluate_with(test[200])
  both = evaluate_with(test[200] | test[150])
  assert bright_only['threshold_rule'] == both['threshold_rule'] == 'labeled'
  # Fitted on the labeled images alone, by the paper's rule, computed here without the evaluator.
  expected = curves.fit_threshold(lab_images.mean(-1) / 255.0, labeled.masks[..., 0])
  assert 150 / 255 < expected <= 200 / 255
  assert bright_only['threshold'] == both['threshold'] == pytest.approx(expected, rel=1e-6)
  # The oracle (fitted on the test masks) moves with them, and so do the test metrics.
  assert bright_only['oracle']['threshold'] > 160 / 255 > both['oracle']['threshold'] > 110 / 255
  assert bright_only['test']['defect_iou'] == pytest.approx(1.0)
  assert both['test']['defect_iou'] == pytest.approx(0.5)


def test_eval_json_is_strict_json_with_null_for_undefined_metrics(run, tmp_path):
  evaluate_with, _, test, _ = run
  out = evaluate_with(test[200], workdir=str(tmp_path))
  assert np.isnan(out['per_defect_type']['scratch']['image_auroc'])  # every test image has a defect
  saved = test_fileio.load_strict((tmp_path / 'eval.json').read_text())
  assert saved['per_defect_type']['scratch']['image_auroc'] is None
  assert saved['test']['defect_iou'] == pytest.approx(out['test']['defect_iou'])


def test_only_anomaly_maps_get_the_trivial_yardstick(run):
  """eval.json's ``trivial`` (|I - M|, the yardstick of the AE's D, feeding diff_quality.csv) is for
  anomaly-score methods with a monitor (the AE); Mean Teacher's monitor (teacher IoU) must not add it,
  or its probability maps land in diff_quality.csv as if they were a difference image."""
  import dataclasses
  evaluate_with, labeled, test, _ = run
  global METHOD
  plain = METHOD
  try:
    METHOD = dataclasses.replace(plain, monitor='teacher_iou_labeled', score_kind='probability')
    assert 'trivial' not in evaluate_with(test[200])
  finally:
    METHOD = plain


def good_and_scratched(seed: int, texture: bool) -> tuple[np.ndarray, pipeline.CategoryData]:
  """Five random test images, good / scratch / good / good / scratch (the good ones are test images 0, 2
  and 3), the first two also the labeled split; a texture is scored in tiles of SIZE // 2."""
  images = np.random.default_rng(seed).integers(0, 256, (5, SIZE, SIZE, 3)).astype(np.uint8)
  types = ['good', 'scratch', 'good', 'good', 'scratch']
  masks = np.zeros((5, SIZE, SIZE), bool)
  masks[1, :4, :4] = masks[4, 2:6, 2:6] = True
  empty = split(np.zeros((0, SIZE, SIZE, 3), np.uint8), np.zeros((0, SIZE, SIZE), bool), [])
  data = pipeline.CategoryData(unlabeled=empty, labeled=split(images[:2], masks[:2], types[:2]),
                               test=split(images, masks, types), manifest={}, texture=texture,
                               image_size=SIZE // 2 if texture else SIZE)
  return images, data


def test_reconstruction_error_is_the_plain_mean_abs_difference_of_the_good_test_images():
  """eval.json's ``recon_error_good``: mean |I - reconstruction| over the good test images' pixels and
  channels, computed here with numpy; not the score map (whose channel max would double it)."""
  import dataclasses
  images, data = good_and_scratched(1, texture=False)
  grey = lambda state, x: 0.5 + 0 * x  # a 'model' that answers mid-grey everywhere
  method = dataclasses.replace(METHOD, reconstruct=grey,
                               score_map=lambda state, x: abs(x - 0.5).max(axis=-1))
  out = evaluate.evaluate(method, None, data, base.MethodContext(image_size=SIZE, texture=False, steps_per_epoch=1),
                          sharding.create_mesh(), synthetic.get_config('washer,smoke'), time_it=False)
  good = images[[0, 2, 3]].astype(np.float64) / 255.0
  assert out['recon_error_good'] == pytest.approx(np.abs(good - 0.5).mean(), rel=1e-5)
  assert out['recon_error_good'] < np.abs(good - 0.5).max(axis=-1).mean()


def test_a_method_that_scores_with_its_reconstruction_is_searched_once_and_reports_that_reconstruction():
  """AnoGAN's path (``score_with_reconstruction``): test and labeled scores, the good images'
  reconstruction error and the sink's 'test_reconstruction' all come from the one joint map; the
  separate ``reconstruct`` is never called. On a texture (tiles of 8 px of 16 px images) both maps are
  stitched back: each pixel's reconstruction here is its own tile's index, checked against numpy."""
  import dataclasses
  images, data = good_and_scratched(2, texture=True)

  def joint(state, x):  # x: tiles [4 B, 8, 8, 3]; tile t of image b is row 4 b + t (row-major tiles)
    tile_no = (jnp.arange(x.shape[0]) % 4).astype(jnp.float32)
    recon = 0 * x + tile_no[:, None, None, None] / 4
    return jnp.abs(x - recon).max(axis=-1), recon

  def never(state, x):
    raise AssertionError('the reconstruction was searched a second time')
  method = dataclasses.replace(METHOD, reconstruct=never, score_map=never, score_with_reconstruction=joint)
  seen = {}
  out = evaluate.evaluate(method, None, data, base.MethodContext(image_size=SIZE // 2, texture=True, steps_per_epoch=1),
                          sharding.create_mesh(), synthetic.get_config('washer,smoke'), time_it=False,
                          score_sink=seen.__setitem__)
  expect = np.zeros((SIZE, SIZE, 3))
  for t, (r, c) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8)]):
    expect[r:r + 8, c:c + 8] = t / 4
  x = images.astype(np.float64) / 255.0
  np.testing.assert_allclose(seen['test_reconstruction'], np.broadcast_to(expect, x.shape), atol=1e-6)
  np.testing.assert_allclose(seen['test'], np.abs(x - expect).max(-1), atol=1e-6)
  np.testing.assert_allclose(seen['train'], np.abs(x[:2] - expect).max(-1), atol=1e-6)
  assert out['recon_error_good'] == pytest.approx(np.abs(x[[0, 2, 3]] - expect).mean(), rel=1e-5)


def test_timing_skips_the_warm_up_of_a_run_batch_size_and_stops_at_its_budget(monkeypatch):
  """Table A1's timing: a batch size the scorer already ran is not warmed up again, and repeats stop
  once their time passes the budget; a new batch size is warmed up first and then timed 3 times."""
  mesh = sharding.create_mesh()
  ctx = base.MethodContext(image_size=SIZE, texture=False, steps_per_epoch=1)
  scorer = evaluate.Scorer(METHOD, None, ctx, mesh, batch_size=2)
  clock, calls = [0.0], []
  monkeypatch.setattr(evaluate.time, 'perf_counter', lambda: clock[0])

  def slow(state, x):  # 50 ms per image on the fake clock
    calls.append(x.shape[0])
    clock[0] += 0.05 * x.shape[0]
    return brightness(state, x)
  images = np.full((4, SIZE, SIZE, 3), 100, np.uint8)
  scorer(images)  # the real jit: scores two batches of 2
  scorer._jit = slow
  ms = scorer.time_per_image(images, 2, budget_s=0.15)  # 0.1 s a run: warm already, 2 runs pass 0.15 s
  assert calls == [2, 2]
  assert ms == pytest.approx(50.0)
  calls.clear()
  assert scorer.time_per_image(images, 1, budget_s=10.0) == pytest.approx(50.0)
  assert calls == [1, 1, 1, 1]  # not run before: warm-up + 3 repeats


def test_colour_distance_is_the_mahalanobis_distance_from_the_mean_image():
  """|W (I - M)| against scipy's Mahalanobis distance under the pooled covariance (+ the rounding
  variance), and the case it exists for: normal colours on one line (grey times a tint), a defect of
  the same brightness but another hue stands far out, although |I - M| sees it no more than texture."""
  from scipy.spatial import distance
  rng = np.random.default_rng(0)
  tint = np.array([0.72, 1.0, 0.55])
  grey = rng.uniform(40, 220, (12, SIZE, SIZE, 1))
  normal = np.round(grey * tint).astype(np.uint8)
  mean = normal.astype(np.float64).mean(0) / 255.0
  w = evaluate.colour_whitener(normal, mean, chunk=5)
  d = (normal / 255.0 - mean).reshape(-1, 3)
  cov = d.T @ d / len(d) + evaluate.ROUNDING_VARIANCE * np.eye(3)
  np.testing.assert_allclose(w @ cov @ w.T, np.eye(3), atol=1e-6)
  image = normal[:1].copy()
  image[0, 3, 3] = np.clip(np.round(image[0, 3, 3] + np.array([15, -15, 15])), 0, 255).astype(np.uint8)
  got = evaluate.colour_distance(image, mean, w)[0]
  vi = np.linalg.inv(cov)
  want = np.array([[distance.mahalanobis(image[0, y, x] / 255.0, mean[y, x], vi) for x in range(SIZE)]
                   for y in range(SIZE)])
  np.testing.assert_allclose(got, want / (1 + want), rtol=1e-4)
  assert want[3, 3] > 5 * np.delete(want.ravel(), 3 * SIZE + 3).max()  # the hue shift is the outlier
