"""Segmentation metrics of score maps against masks, streamed batch by batch on the host; their names."""

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from semiseg import curves

# Ground-truth regions for AUPRO are 8-connected, as in MVTec AD's official evaluation
# (pro_curve_util.py labels with structure=np.ones((3, 3))). The zero planes keep the
# images of a batch apart, so one ndimage.label call labels the whole BxHxW batch.
_REGION_STRUCTURE_3x3x3 = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE_3x3x3[1] = True

# The metric names, here only: eval.json's keys, results.csv's columns and the report's tables use them.
BINARY_METRICS = ('defect_iou', 'miou', 'dice', 'mae_pixels')  # at a threshold
THRESHOLD_FREE = ('pixel_auroc', 'aupro', 'pixel_ap', 'image_auroc', 'f1_max')
METRIC_NAMES = BINARY_METRICS + THRESHOLD_FREE
RESULT_KEYS = METRIC_NAMES + ('num_images',)  # SegmentationMetrics.result()


# ----------------------------------------------------------------------------------------
# Binary-prediction metrics from confusion counts.

def confusion(pred_bool: np.ndarray, mask_bool: np.ndarray) -> tuple[int, int, int, int]:
  """Counts the pixel confusion of a binary prediction against a binary mask.

  Args:
    pred_bool: predicted defect pixels, any shape.
    mask_bool: ground-truth defect pixels, same shape.

  Returns:
    (tp, fp, fn, tn) summed over all pixels, as Python ints.
  """
  pred = np.asarray(pred_bool, dtype=bool)
  mask = np.asarray(mask_bool, dtype=bool)
  if pred.shape != mask.shape:
    raise ValueError(f'prediction shape {pred.shape} != mask shape {mask.shape}')
  tp = int(np.count_nonzero(pred & mask))
  fp = int(np.count_nonzero(pred)) - tp
  fn = int(np.count_nonzero(mask)) - tp
  return tp, fp, fn, pred.size - tp - fp - fn


def iou_from_counts(tp: int, fp: int, fn: int, zero_division: float = 1.0) -> float:
  """Class IoU = TP / (TP + FP + FN) (paper section 4.4).

  Args:
    tp, fp, fn: pixel counts for the class.
    zero_division: value when TP + FP + FN == 0, i.e. the class is absent from both mask
      and prediction. 1.0 by default (nothing to find, nothing falsely found), as
      sklearn's jaccard_score(zero_division=1.0).

  Returns:
    The IoU in [0, 1].
  """
  denom = tp + fp + fn
  return float(zero_division) if denom == 0 else tp / denom


def miou_from_counts(tp: int, fp: int, fn: int, tn: int, zero_division: float = 1.0) -> float:
  """Two-class mean IoU: the mean of the defect IoU and the non-defect IoU TN / (TN + FN + FP).

  Args:
    tp, fp, fn, tn: defect-class pixel counts.
    zero_division: value of a class IoU whose denominator is 0 (see iou_from_counts).

  Returns:
    The mean IoU in [0, 1]; equals sklearn's jaccard_score(average='macro', labels=[0, 1]).
  """
  # For the non-defect class the roles swap: its TP is TN, its FP is FN, its FN is FP.
  return 0.5 * (iou_from_counts(tp, fp, fn, zero_division)
                + iou_from_counts(tn, fn, fp, zero_division))


def dice_from_counts(tp: int, fp: int, fn: int, zero_division: float = 1.0) -> float:
  """Dice = 2TP / (2TP + FP + FN), the pixel F1 of the defect class.

  Args:
    tp, fp, fn: pixel counts.
    zero_division: value when 2TP + FP + FN == 0 (see iou_from_counts).

  Returns:
    The Dice coefficient in [0, 1].
  """
  denom = 2 * tp + fp + fn
  return float(zero_division) if denom == 0 else 2 * tp / denom


def mae_from_counts(fp: int, fn: int, num_images: int) -> float:
  """Mean number of misclassified pixels per image (the paper's Table A2 "MAE").

  Args:
    fp, fn: false positive and false negative pixels summed over the images.
    num_images: how many images they were summed over.

  Returns:
    (FP + FN) / num_images, which is the mean over images of #(prediction != mask);
    nan if num_images is 0. It is counted at the resolution the maps are given in.
  """
  return float('nan') if num_images == 0 else (fp + fn) / num_images


def defect_iou(probabilities: np.ndarray, masks: np.ndarray, threshold: float) -> float:
  """Defect-class IoU of maps thresholded at ``threshold``, counted over all pixels (``iou_from_counts``)."""
  tp, fp, fn, _ = confusion(np.asarray(probabilities) >= threshold, masks)
  return iou_from_counts(tp, fp, fn)


def pixel_auroc(scores: np.ndarray, masks: np.ndarray) -> float:
  """Exact pixel AUROC of score maps against boolean masks; NaN when one class is missing."""
  labels = np.asarray(masks).reshape(-1).astype(bool)
  if labels.all() or not labels.any():
    return float('nan')
  return float(curves.auroc(curves.exact_curve(np.asarray(scores).reshape(-1).astype(np.float64), labels)))


# ----------------------------------------------------------------------------------------
# The streaming accumulator.

@dataclasses.dataclass
class _State:
  """What one group of images (a defect type, or all) contributes; states merge by adding."""
  num_bins: int
  tp: int = 0
  fp: int = 0
  fn: int = 0
  tn: int = 0
  num_images: int = 0
  num_regions: int = 0
  num_clipped: int = 0
  num_pixels: int = 0
  image_max: list[np.ndarray] = dataclasses.field(default_factory=list)
  image_label: list[np.ndarray] = dataclasses.field(default_factory=list)
  # Binned mode.
  pos_hist: np.ndarray | None = None
  neg_hist: np.ndarray | None = None
  region_mass: np.ndarray | None = None  # sum over regions of the fraction of it per bin
  # Exact mode: every pixel.
  scores: list[np.ndarray] = dataclasses.field(default_factory=list)
  labels: list[np.ndarray] = dataclasses.field(default_factory=list)
  region_weight: list[np.ndarray] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.pos_hist = np.zeros(self.num_bins, np.int64)
    self.neg_hist = np.zeros(self.num_bins, np.int64)
    self.region_mass = np.zeros(self.num_bins, np.float64)

  def merge(self, other: '_State') -> None:
    for f in ('tp', 'fp', 'fn', 'tn', 'num_images', 'num_regions', 'num_clipped',
              'num_pixels'):
      setattr(self, f, getattr(self, f) + getattr(other, f))
    for f in ('pos_hist', 'neg_hist', 'region_mass'):
      setattr(self, f, getattr(self, f) + getattr(other, f))
    for f in ('image_max', 'image_label', 'scores', 'labels', 'region_weight'):
      getattr(self, f).extend(getattr(other, f))


@dataclasses.dataclass
class _Batch:
  """One update's arrays, computed once for the whole batch and read per group of images."""
  scores: np.ndarray  # BxHxW
  masks: np.ndarray  # BxHxW bool
  region_weight: np.ndarray  # BxHxW: 1 / size of the ground-truth region a pixel is in, else 0
  regions_per_image: np.ndarray  # B
  tp: np.ndarray | None = None  # B, at the threshold
  fp: np.ndarray | None = None
  fn: np.ndarray | None = None
  bins: np.ndarray | None = None  # BxHxW histogram bin (binned mode)
  clipped: np.ndarray | None = None  # B: pixels outside score_range


def _checked_batch(scores_BxHxW, masks_BxHxW, defect_types) -> tuple[np.ndarray, np.ndarray, list]:
  scores = np.asarray(scores_BxHxW)
  masks = np.asarray(masks_BxHxW) != 0
  if scores.ndim != 3 or scores.shape != masks.shape:
    raise ValueError(f'need BxHxW scores and masks, got {scores.shape} and {masks.shape}')
  if not np.isfinite(scores).all():
    raise ValueError('scores contain nan or inf')
  b = scores.shape[0]
  # str(): names may arrive as a numpy array; keys must be plain str for JSON reports.
  keys = [None] * b if defect_types is None else [str(k) for k in defect_types]
  if len(keys) != b:
    raise ValueError(f'{len(keys)} defect types for a batch of {b}')
  return scores, masks, keys


def _region_weights(masks_BxHxW: np.ndarray) -> dict[str, np.ndarray]:
  """Ground-truth regions and per-pixel weight 1/|region|, so summing weights over covered pixels
  gives the sum over regions of their covered fraction."""
  b = masks_BxHxW.shape[0]
  region_ids, n = ndimage.label(masks_BxHxW, structure=_REGION_STRUCTURE_3x3x3)
  sizes = np.bincount(region_ids.ravel(), minlength=n + 1)
  inv_size = np.zeros(n + 1)
  inv_size[1:] = 1.0 / sizes[1:]
  image_of_region = np.zeros(n + 1, np.int64)
  image_of_region[region_ids.reshape(b, -1)] = np.arange(b)[:, None]
  return {'region_weight': inv_size[region_ids],
          'regions_per_image': np.bincount(image_of_region[1:], minlength=b)}


def _confusion_per_image(pred: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tp, fp, fn) per image of BxHxW boolean predictions and masks."""
  tp = np.count_nonzero(pred & masks, axis=(1, 2))
  return tp, np.count_nonzero(pred, axis=(1, 2)) - tp, np.count_nonzero(masks, axis=(1, 2)) - tp


class SegmentationMetrics:
  """Streams score maps of one category and returns its metrics, summed over all pixels.

  Feed batches with update(); nothing but fixed-size histograms, four confusion counts and
  one max score per image is kept (binned mode, the default), so a category never needs
  all its maps in memory.

  Conventions:
    - Pixel labels: mask != 0 is defect. Prediction at `threshold`: score >= threshold.
    - defect_iou = TP/(TP+FP+FN); miou = mean(defect IoU, non-defect IoU TN/(TN+FN+FP));
      dice = 2TP/(2TP+FP+FN); mae_pixels = mean over images of #(prediction != mask).
      These are exact (counted at update time) and nan when `threshold` is None. A 0/0
      class IoU or Dice (class absent from mask and prediction) is 1.0.
    - pixel_auroc, pixel_ap (step-wise, as sklearn's average_precision_score), f1_max (max
      pixel F1 over thresholds) and aupro (MVTec AD: 8-connected ground-truth regions per
      image, PRO = mean over all regions of the set of the fraction of each region with
      score >= t, FPR over all non-defect pixels of the set, trapezoid up to fpr_limit with
      linear interpolation there, divided by fpr_limit). nan where undefined: AUROC needs
      defect and non-defect pixels, AP and F1 need defect pixels, AUPRO needs a region and
      a non-defect pixel.
    - image_auroc: image score = max of its map, label = any defect pixel; always exact;
      nan unless both good and defective images were seen (so nan per defect type).

  Binned mode: scores go into `num_bins` equal bins over `score_range`; scores outside are
  clipped into the end bins (counted in clipped_fraction; the curves stay valid but coarser
  there). Each binned curve point is an exact point of the exact curve (threshold = a bin's
  lower edge); only the ordering of pixels inside one bin is lost. The error against exact
  mode is therefore bounded, and binning_error_bounds() reports the bounds:
    |AUROC_binned - AUROC| <= sum_k pos_k neg_k / (2 P N)   (within-bin pairs count as ties)
    |AUPRO_binned - AUPRO| <= sum_{k below fpr_limit} dFPR_k dPRO_k / fpr_limit
    |AP_binned - AP| <= sum_k dRecall_k (max - min precision reachable inside bin k)
    0 <= F1max - F1max_binned <= max_k 2 TP_k / (P + TP_k + FP_{k+1}) - F1max_binned
  Exact mode (exact=True) keeps every pixel score: for tests and small sets.
  """

  def __init__(self, threshold: float | None = None, num_bins: int = 1000,
               score_range: tuple[float, float] | None = (0.0, 1.0), exact: bool = False,
               fpr_limit: float = 0.3):
    """Creates an empty accumulator.

    Args:
      threshold: binary threshold for the IoU/Dice/MAE metrics (score >= threshold is
        defect); None leaves those metrics nan (e.g. when fitting a threshold).
      num_bins: histogram bins over score_range (binned mode).
      score_range: (low, high) of the histograms. Scores outside are clipped. Must be given
        in binned mode: set it beforehand (e.g. from the labeled images' scores) or choose a
        generous one; None is allowed only with exact=True.
      exact: keep every score and compute the threshold-free metrics exactly.
      fpr_limit: the FPR up to which the PRO curve is integrated.
    """
    if not exact:
      if score_range is None:
        raise ValueError('binned mode needs score_range; set it first or use exact=True')
      if not (np.isfinite(score_range).all() and score_range[0] < score_range[1]):
        raise ValueError(f'score_range must be finite and increasing, got {score_range}')
      if num_bins < 1:
        raise ValueError(f'num_bins must be >= 1, got {num_bins}')
    if not 0.0 < fpr_limit <= 1.0:
      raise ValueError(f'fpr_limit must be in (0, 1], got {fpr_limit}')
    self.threshold = threshold
    self.num_bins = num_bins
    self.score_range = score_range
    self.exact = exact
    self.fpr_limit = fpr_limit
    self.bin_edges = (None if score_range is None
                      else np.linspace(score_range[0], score_range[1], num_bins + 1))
    # One state per defect type (key None for images given without one); totals merge them.
    self._states: dict[str | None, _State] = {}

  def _new_state(self) -> _State:
    return _State(self.num_bins if not self.exact else 0)

  def update(self, scores_BxHxW: np.ndarray, masks_BxHxW: np.ndarray,
             defect_types: Sequence[str] | None = None) -> None:
    """Adds a batch of score maps with their masks.

    Args:
      scores_BxHxW: finite float scores, higher = more defective.
      masks_BxHxW: ground truth, nonzero = defect (bool, 0/1 or 0/255).
      defect_types: B names (e.g. 'good', 'crack') for result_per_defect_type, or None.
    """
    scores, masks, keys = _checked_batch(scores_BxHxW, masks_BxHxW, defect_types)
    batch = _Batch(scores=scores, masks=masks, **_region_weights(masks))
    if self.threshold is not None:
      batch.tp, batch.fp, batch.fn = _confusion_per_image(scores >= self.threshold, masks)
    if not self.exact:
      batch.bins, batch.clipped = self._bin_indices(scores)
    groups: dict[str | None, list[int]] = {}
    for i, key in enumerate(keys):
      groups.setdefault(key, []).append(i)
    for key, members in groups.items():
      sel = slice(None) if len(members) == len(keys) else np.asarray(members)
      self._add(self._states.setdefault(key, self._new_state()), batch, sel, len(members))

  def _bin_indices(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(histogram bin of every pixel, pixels clipped into the end bins per image)."""
    lo, hi = self.score_range
    idx = np.floor((scores - lo) * (self.num_bins / (hi - lo)))
    clipped_b = np.count_nonzero((scores < lo) | (scores > hi), axis=(1, 2))
    return np.clip(idx, 0, self.num_bins - 1).astype(np.int64), clipped_b

  def _add(self, st: _State, batch: '_Batch', sel, n: int) -> None:
    """Adds the images ``sel`` of ``batch`` (``n`` of them) to one group's state."""
    scores, m, weight = batch.scores[sel], batch.masks[sel], batch.region_weight[sel]
    st.num_images += n
    st.num_pixels += m.size
    st.num_regions += int(batch.regions_per_image[sel].sum())
    st.image_max.append(scores.reshape(n, -1).max(axis=1))
    st.image_label.append(m.reshape(n, -1).any(axis=1))
    if self.threshold is not None:
      tp, fp, fn = int(batch.tp[sel].sum()), int(batch.fp[sel].sum()), int(batch.fn[sel].sum())
      st.tp += tp
      st.fp += fp
      st.fn += fn
      st.tn += m.size - tp - fp - fn
    if self.exact:
      st.scores.append(scores.ravel())
      st.labels.append(m.ravel())
      st.region_weight.append(weight.ravel())
    else:
      k = batch.bins[sel]
      st.num_clipped += int(batch.clipped[sel].sum())
      st.pos_hist += np.bincount(k[m], minlength=self.num_bins)
      st.neg_hist += np.bincount(k[~m], minlength=self.num_bins)
      st.region_mass += np.bincount(k[m], weights=weight[m], minlength=self.num_bins)

  def _merged(self, keys: Sequence[str | None] | None = None) -> _State:
    total = self._new_state()
    for key in (self._states if keys is None else keys):
      total.merge(self._states[key])
    return total

  def _curve(self, st: _State) -> curves.Curve:
    if self.exact:
      if not st.scores:
        return curves.Curve(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
      return curves.exact_curve(np.concatenate(st.scores).astype(np.float64),
                          np.concatenate(st.labels), np.concatenate(st.region_weight))
    return curves.binned_curve(st.pos_hist, st.neg_hist, self.bin_edges, st.region_mass)

  def _metrics(self, st: _State) -> dict[str, float]:
    nan = float('nan')
    if self.threshold is None:
      binary = dict(defect_iou=nan, miou=nan, dice=nan, mae_pixels=nan)
    else:
      binary = dict(defect_iou=iou_from_counts(st.tp, st.fp, st.fn),
                    miou=miou_from_counts(st.tp, st.fp, st.fn, st.tn),
                    dice=dice_from_counts(st.tp, st.fp, st.fn),
                    mae_pixels=mae_from_counts(st.fp, st.fn, st.num_images))
    c = self._curve(st)
    image_max = np.concatenate(st.image_max) if st.image_max else np.zeros(0)
    image_label = np.concatenate(st.image_label) if st.image_label else np.zeros(0, bool)
    return dict(**binary,
                pixel_auroc=curves.auroc(c),
                aupro=curves.aupro(c, st.num_regions, self.fpr_limit),
                pixel_ap=curves.average_precision(c),
                image_auroc=curves.auroc(curves.exact_curve(image_max.astype(np.float64), image_label)),
                f1_max=curves.f1_max(c),
                num_images=st.num_images)

  def result(self) -> dict[str, float]:
    """Metrics over every image seen (keys: RESULT_KEYS; see the class docstring)."""
    if not self._states:
      raise ValueError('no images: call update() first')
    return self._metrics(self._merged())

  def result_per_defect_type(self) -> dict[str, dict[str, float]]:
    """Metrics over the images of each named defect type, same keys as result()."""
    return {k: self._metrics(self._states[k])
            for k in sorted(k for k in self._states if k is not None)}

  def fit_threshold(self) -> float:
    """The Youden threshold (see curves.fit_threshold) of every pixel seen; binned: a bin edge."""
    st = self._merged()
    if self.exact:
      return curves.youden(self._curve(st))
    return curves.fit_threshold_binned(st.pos_hist, st.neg_hist, self.bin_edges)

  def histograms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(defect pixel counts, non-defect pixel counts, bin edges) of every pixel seen."""
    if self.exact:
      raise ValueError('exact mode keeps no histograms')
    st = self._merged()
    return st.pos_hist.copy(), st.neg_hist.copy(), self.bin_edges.copy()

  @property
  def clipped_fraction(self) -> float:
    """Fraction of pixels whose score fell outside score_range (binned mode)."""
    st = self._merged()
    return st.num_clipped / st.num_pixels if st.num_pixels else 0.0

  def binning_error_bounds(self) -> dict[str, float]:
    """Upper bounds on |binned - exact| for pixel_auroc, aupro, pixel_ap and f1_max.

    Valid for any scores (also clipped ones), since binning is monotone in the score: see
    the class docstring. nan where the metric itself is undefined.
    """
    if self.exact:
      return dict(pixel_auroc=0.0, aupro=0.0, pixel_ap=0.0, f1_max=0.0)
    st = self._merged()
    pos, neg = st.pos_hist.astype(np.float64), st.neg_hist.astype(np.float64)
    p, n = pos.sum(), neg.sum()
    nan = float('nan')
    bounds = dict(pixel_auroc=nan, aupro=nan, pixel_ap=nan, f1_max=nan)
    if p > 0 and n > 0:
      bounds['pixel_auroc'] = float(np.sum(pos * neg) / (2 * p * n))
    c = curves.binned_curve(st.pos_hist, st.neg_hist, self.bin_edges, st.region_mass)
    if p > 0:
      # Counts at the top (TP_{k+1}, FP_{k+1}) and bottom (TP_k, FP_k) of each occupied bin.
      tp_hi, fp_hi = np.r_[0, c.tps[:-1]], np.r_[0, c.fps[:-1]]
      with np.errstate(invalid='ignore', divide='ignore'):
        prec_max = c.tps / (c.tps + fp_hi)
        prec_min = np.nan_to_num(tp_hi / (tp_hi + c.fps))
      bounds['pixel_ap'] = float(np.sum((c.tps - tp_hi) / p * (prec_max - prec_min)))
      f1_upper = np.max(2 * c.tps / (p + c.tps + fp_hi))
      bounds['f1_max'] = float(f1_upper - curves.f1_max(c))
    if st.num_regions > 0 and n > 0:
      fpr, pro = curves.pro_points(c, st.num_regions)
      below = fpr[:-1] < self.fpr_limit
      bounds['aupro'] = float(np.sum((np.diff(fpr) * np.diff(pro))[below]) / self.fpr_limit)
    return bounds
