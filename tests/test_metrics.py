"""Tests for semiseg.metrics (and its curves) against scikit-learn, hand counts and a hand-computed AUPRO."""

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from semiseg import curves, metrics


def _smooth_maps(seed: int, b: int = 12, h: int = 48, w: int = 48, num_good: int = 3):
  """Smooth random score maps in (0, 1) with blob-shaped defects; the first num_good are good."""
  rng = np.random.default_rng(seed)
  noise = ndimage.gaussian_filter(rng.normal(size=(b, h, w)), sigma=(0, 2, 2))
  noise /= noise.std()
  yy, xx = np.mgrid[:h, :w]
  masks = np.zeros((b, h, w), bool)
  for i in range(num_good, b):
    for _ in range(rng.integers(1, 4)):
      cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 7)
      masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
  signal = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1.5, 1.5))
  scores = 1 / (1 + np.exp(-(0.8 * noise + 3.0 * signal - 1.0)))
  return scores.astype(np.float32), masks


def _feed(acc: metrics.SegmentationMetrics, scores, masks, types=None, batch: int = 5):
  for s in range(0, len(scores), batch):
    acc.update(scores[s:s + batch], masks[s:s + batch],
               None if types is None else types[s:s + batch])
  return acc


# ---------------------------------------------------------------- binary metrics

def test_counts_match_sklearn():
  rng = np.random.default_rng(0)
  pred = rng.random((4, 16, 16)) < 0.3
  mask = rng.random((4, 16, 16)) < 0.2
  tp, fp, fn, tn = metrics.confusion(pred, mask)
  y, p = mask.ravel(), pred.ravel()
  assert (tp, fp, fn, tn) == tuple(skm.confusion_matrix(y, p).ravel()[[3, 1, 2, 0]])
  assert metrics.iou_from_counts(tp, fp, fn) == pytest.approx(skm.jaccard_score(y, p))
  assert metrics.miou_from_counts(tp, fp, fn, tn) == pytest.approx(
      skm.jaccard_score(y, p, average='macro'))
  assert metrics.dice_from_counts(tp, fp, fn) == pytest.approx(skm.f1_score(y, p))


def test_zero_division_is_one_like_sklearn():
  # No defect in the mask and none predicted: the defect IoU/Dice is 0/0 -> 1.0.
  pred = mask = np.zeros(10, bool)
  tp, fp, fn, tn = metrics.confusion(pred, mask)
  assert metrics.iou_from_counts(tp, fp, fn) == 1.0
  assert metrics.dice_from_counts(tp, fp, fn) == 1.0
  assert metrics.miou_from_counts(tp, fp, fn, tn) == skm.jaccard_score(
      mask, pred, average='macro', labels=[0, 1], zero_division=1.0) == 1.0
  assert metrics.iou_from_counts(0, 0, 0, zero_division=0.0) == 0.0


def test_accumulator_binary_metrics_and_mae_hand_count():
  scores, masks = _smooth_maps(1)
  scores = np.round(scores.astype(np.float64), 2)  # pixels exactly at t: score >= t is defect
  t = 0.55
  assert np.any(scores == t)
  acc = _feed(metrics.SegmentationMetrics(threshold=t), scores, masks)
  r = acc.result()
  y, p = masks.ravel(), (scores >= t).ravel()
  assert r['defect_iou'] == pytest.approx(skm.jaccard_score(y, p), abs=1e-12)
  assert r['miou'] == pytest.approx(skm.jaccard_score(y, p, average='macro'), abs=1e-12)
  assert r['dice'] == pytest.approx(skm.f1_score(y, p), abs=1e-12)
  wrong_per_image = [int(np.sum((s >= t) != m)) for s, m in zip(scores, masks)]
  assert r['mae_pixels'] == pytest.approx(sum(wrong_per_image) / len(wrong_per_image))
  assert r['num_images'] == len(scores)


def test_no_threshold_leaves_binary_metrics_nan():
  scores, masks = _smooth_maps(2)
  r = _feed(metrics.SegmentationMetrics(), scores, masks).result()
  assert all(math.isnan(r[k]) for k in ('defect_iou', 'miou', 'dice', 'mae_pixels'))
  assert 0.5 < r['pixel_auroc'] <= 1.0


# ---------------------------------------------------------------- threshold-free, exact

def test_exact_mode_matches_sklearn():
  scores, masks = _smooth_maps(3)
  scores = np.round(scores, 2)  # ties, so tie handling is checked too
  acc = _feed(metrics.SegmentationMetrics(exact=True, score_range=None), scores, masks)
  r = acc.result()
  y, s = masks.ravel(), scores.ravel()
  assert r['pixel_auroc'] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-6)
  assert r['pixel_ap'] == pytest.approx(skm.average_precision_score(y, s), abs=1e-6)
  img_y, img_s = masks.any(axis=(1, 2)), scores.max(axis=(1, 2))
  assert r['image_auroc'] == pytest.approx(skm.roc_auc_score(img_y, img_s), abs=1e-6)
  prec, rec, _ = skm.precision_recall_curve(y, s)
  with np.errstate(invalid='ignore'):
    f1 = 2 * prec * rec / (prec + rec)
  assert r['f1_max'] == pytest.approx(np.nanmax(f1), abs=1e-6)


def test_batching_does_not_change_exact_results():
  scores, masks = _smooth_maps(4)
  one = metrics.SegmentationMetrics(0.5, exact=True)
  one.update(scores, masks)
  many = _feed(metrics.SegmentationMetrics(0.5, exact=True), scores, masks, batch=2)
  assert one.result() == pytest.approx(many.result(), abs=1e-12)


# ---------------------------------------------------------------- AUPRO

def _two_region_case():
  # 5x5 image, 20 non-defect pixels (FPR steps of 0.05) and two 8-connected regions:
  #   A = {(0,0): .9, (1,1): .5}           (diagonal neighbours: one region in 8-connectivity)
  #   B = {(3,3): .8, (3,4): .6, (4,4): .2}
  # non-defect scores: .7, .55, .4, .3, four at .2, twelve at 0.
  # Threshold: coverage A, B -> PRO      ; FPR
  #   .9 : 1/2, 0   -> 3/12              ; 0
  #   .8 : 1/2, 1/3 -> 5/12              ; 0
  #   .7 : same     -> 5/12              ; 1/20
  #   .6 : 1/2, 2/3 -> 7/12              ; 1/20
  #   .55: same     -> 7/12              ; 2/20
  #   .5 : 1,  2/3  -> 10/12             ; 2/20
  #   .4 , .3       -> 10/12             ; 3/20, 4/20
  #   .2 : 1,  1    -> 1                 ; 8/20   (tied defect and normal pixels: one slope)
  #   0  :          -> 1                 ; 1
  # Area up to FPR .3: .05*5/12 + .05*7/12 + .10*10/12
  #   + on [.2, .3] the segment (.2, 10/12) -> (.4, 1) interpolated to 11/12 at .3:
  #     .1 * (10/12 + 11/12) / 2 = .0875
  # = .05 + 1/12 + .0875 = 53/240; AUPRO = (53/240) / .3 = 53/72.
  scores = np.zeros((5, 5))
  mask = np.zeros((5, 5), bool)
  for (i, j), v in {(0, 0): .9, (1, 1): .5, (3, 3): .8, (3, 4): .6, (4, 4): .2}.items():
    scores[i, j], mask[i, j] = v, True
  free = list(zip(*np.nonzero(~mask)))
  for (i, j), v in zip(free, [.7, .55, .4, .3, .2, .2, .2, .2]):
    scores[i, j] = v
  return scores[None], mask[None]


@pytest.mark.parametrize('exact', [True, False])
def test_aupro_hand_computed_two_regions(exact):
  scores, masks = _two_region_case()
  # 100 bins put every distinct score in its own bin, so binned must equal the hand value.
  acc = metrics.SegmentationMetrics(exact=exact, num_bins=100)
  acc.update(scores, masks)
  assert acc.result()['aupro'] == pytest.approx(53 / 72, abs=1e-9)


def test_aupro_regions_are_8_connected_within_an_image():
  scores, masks = _two_region_case()
  # With 4-connectivity A would be two 1-pixel regions and PRO a mean over three:
  #   .9: 1/3; .8, .7: 4/9; .6, .55: 5/9; .5 .. .3: 8/9; .2: 1 (FPR .4)
  #   area = .05*4/9 + .05*5/9 + .1*8/9 + .1*(8/9 + 17/18)/2 = 83/360 -> AUPRO 83/108.
  region_ids, n = ndimage.label(masks[0])  # scipy's default structure: 4-connectivity
  assert n == 3
  acc = metrics.SegmentationMetrics(exact=True)
  acc.update(scores, masks)
  assert acc.result()['aupro'] == pytest.approx(53 / 72, abs=1e-9)
  assert abs(53 / 72 - 83 / 108) > 0.03


@pytest.mark.parametrize('exact', [True, False])
def test_aupro_regions_never_join_across_the_images_of_a_batch(exact):
  # Two 5x5 images in one batch. Image 0: region R1, the 2x2 block at rows 3-4, columns 0-1, scored .9.
  # Image 1: region R2, column 0 (5 pixels), scored .05. Seen as one BxHxW volume, R2 touches R1 (same
  # (y, x) at rows 3-4); stacked as one tall image, R1's bottom row touches R2's top pixel.
  # 41 normal pixels score .1 .. .8, so FPR 0 .. 1 is walked with R1 covered and R2 not:
  #   two regions: PRO = (1 + 0) / 2 = 1/2 up to FPR .3 -> AUPRO 1/2;
  #   one joined region: PRO = 4/9 -> AUPRO 4/9.
  scores = np.zeros((2, 5, 5))
  masks = np.zeros((2, 5, 5), bool)
  masks[0, 3:, :2] = True
  masks[1, :, 0] = True
  scores[0][masks[0]], scores[1][masks[1]] = .9, .05
  scores[~masks] = np.linspace(.1, .8, int((~masks).sum()))
  assert ndimage.label(masks, structure=np.ones((3, 3, 3)))[1] == 1  # one region as a volume
  assert ndimage.label(masks.reshape(10, 5))[1] == 1  # and as one tall image
  acc = metrics.SegmentationMetrics(exact=exact, num_bins=1000)
  acc.update(scores, masks)
  assert acc.result()['aupro'] == pytest.approx(1 / 2, abs=1e-9)
  assert abs(1 / 2 - 4 / 9) > 0.05


# ---------------------------------------------------------------- binned vs exact

def test_binned_error_is_small_and_within_bounds():
  scores, masks = _smooth_maps(7, b=16, h=64, w=64)
  exact = _feed(metrics.SegmentationMetrics(0.5, exact=True), scores, masks)
  binned = _feed(metrics.SegmentationMetrics(0.5, num_bins=1000), scores, masks)
  re, rb = exact.result(), binned.result()
  bounds = binned.binning_error_bounds()
  for k in ('pixel_auroc', 'aupro', 'pixel_ap', 'f1_max'):
    err = abs(rb[k] - re[k])
    assert err <= bounds[k] + 1e-9, (k, err, bounds[k])
    assert err < 2e-3, (k, err)
  assert rb['f1_max'] <= re['f1_max'] + 1e-12
  # Exact counts and image maxima do not depend on the bins.
  for k in ('defect_iou', 'miou', 'dice', 'mae_pixels', 'image_auroc', 'num_images'):
    assert rb[k] == re[k]
  assert binned.clipped_fraction == 0.0


def test_coarse_bins_still_within_bounds_and_clipping_counted():
  scores, masks = _smooth_maps(8)
  exact = _feed(metrics.SegmentationMetrics(exact=True), scores, masks)
  coarse = _feed(metrics.SegmentationMetrics(num_bins=7, score_range=(0.3, 0.8)),
                 scores, masks)
  re, rc = exact.result(), coarse.result()
  bounds = coarse.binning_error_bounds()
  for k in ('pixel_auroc', 'aupro', 'pixel_ap', 'f1_max'):
    assert abs(rc[k] - re[k]) <= bounds[k] + 1e-9, k
  outside = np.mean((scores < 0.3) | (scores > 0.8))
  assert coarse.clipped_fraction == pytest.approx(outside) and outside > 0


# ---------------------------------------------------------------- per defect type

def test_per_defect_type_equals_separate_accumulators():
  scores, masks = _smooth_maps(9, b=10, num_good=4)
  types = np.array(['good'] * 4 + ['crack', 'hole'] * 3)  # as a split's array of names
  acc = _feed(metrics.SegmentationMetrics(0.5, exact=True), scores, masks, types, batch=3)
  per = acc.result_per_defect_type()
  assert sorted(per) == ['crack', 'good', 'hole'] and all(type(k) is str for k in per)
  for name, r in per.items():
    idx = [i for i, t in enumerate(types) if t == name]
    alone = metrics.SegmentationMetrics(0.5, exact=True)
    alone.update(scores[idx], masks[idx])
    np.testing.assert_equal(r, alone.result())
  whole = metrics.SegmentationMetrics(0.5, exact=True)
  whole.update(scores, masks)
  assert acc.result() == pytest.approx(whole.result(), abs=1e-12)
  # No defect pixels: threshold-free pixel metrics undefined; one image class: image AUROC.
  for k in ('pixel_auroc', 'aupro', 'pixel_ap', 'f1_max', 'image_auroc'):
    assert math.isnan(per['good'][k])
  assert math.isnan(per['crack']['image_auroc']) and not math.isnan(per['crack']['aupro'])


def test_input_validation():
  with pytest.raises(ValueError):
    metrics.SegmentationMetrics(score_range=None)
  acc = metrics.SegmentationMetrics()
  with pytest.raises(ValueError):
    acc.result()
  with pytest.raises(ValueError):
    acc.update(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
  with pytest.raises(ValueError):
    acc.update(np.full((1, 4, 4), np.nan), np.zeros((1, 4, 4)))
  with pytest.raises(ValueError):
    acc.update(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), ['good'])
  with pytest.raises(ValueError):
    curves.fit_threshold(np.arange(4.0), np.zeros(4))


def test_pixel_auroc_matches_sklearn():
  rng = np.random.default_rng(0)
  masks = rng.random((3, 8, 8)) < 0.2
  scores = rng.random((3, 8, 8)) + 0.5 * masks
  scores[0, 0, :4] = 0.25  # ties
  assert metrics.pixel_auroc(scores, masks) == pytest.approx(skm.roc_auc_score(masks.ravel(), scores.ravel()),
                                                             abs=1e-12)
  assert np.isnan(metrics.pixel_auroc(scores, np.zeros_like(masks)))


def test_defect_iou_matches_sklearn_jaccard_and_the_counts_convention():
  """The monitor's defect IoU of thresholded maps is sklearn's jaccard_score of the defect class; with
  neither a predicted nor a true defect pixel it is 1, as iou_from_counts (and eval.json) count it."""
  rng = np.random.default_rng(1)
  masks = rng.random((2, 6, 6)) < 0.3
  probabilities = np.clip(0.6 * masks + 0.5 * rng.random((2, 6, 6)), 0, 1)
  want = skm.jaccard_score(masks.ravel(), probabilities.ravel() >= 0.5)
  assert metrics.defect_iou(probabilities, masks, 0.5) == pytest.approx(want, abs=1e-12)
  empty = np.zeros_like(masks)
  assert metrics.defect_iou(np.zeros((2, 6, 6)), empty, 0.5) == 1.0 == skm.jaccard_score(
      empty.ravel(), empty.ravel(), zero_division=1.0)
