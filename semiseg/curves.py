"""Threshold-free metrics and the paper's threshold rule, read off one curve.

Exact and binned modes both reduce to the same curve: cumulative counts at thresholds sorted in
decreasing order, where "positive" means score >= threshold. SegmentationMetrics (semiseg/metrics.py)
builds the curves while streaming; fit_threshold is also used on a split's score maps directly.
"""

import dataclasses

import numpy as np

@dataclasses.dataclass(frozen=True)
class Curve:
  thresholds: np.ndarray  # decreasing
  tps: np.ndarray         # defect pixels with score >= threshold
  fps: np.ndarray         # non-defect pixels with score >= threshold
  cover: np.ndarray | None  # sum over GT regions of the covered fraction at the threshold
  num_regions: int = 0


def exact_curve(scores: np.ndarray, labels: np.ndarray,
                 region_weight: np.ndarray | None = None) -> Curve:
  order = np.argsort(scores, kind='stable')[::-1]
  scores = scores[order]
  # The last index of each run of equal scores: all tied pixels switch together.
  last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
  tps = np.cumsum(labels[order], dtype=np.int64)[last]
  fps = (last + 1) - tps
  cover = None
  if region_weight is not None:
    cover = np.cumsum(region_weight[order])[last]
  return Curve(scores[last], tps, fps, cover)


def binned_curve(pos_hist: np.ndarray, neg_hist: np.ndarray, bin_edges: np.ndarray,
                  region_mass: np.ndarray | None = None) -> Curve:
  # Threshold = lower edge of bin k: every pixel in bins >= k has score >= it (binning is
  # monotone), so each binned point is an exact curve point; only occupied bins are kept,
  # so a threshold is never raised above the lowest score it admits (as roc_curve does).
  tps = np.cumsum(pos_hist[::-1])[::-1]
  fps = np.cumsum(neg_hist[::-1])[::-1]
  k = np.flatnonzero((pos_hist + neg_hist) > 0)[::-1]
  cover = None if region_mass is None else np.cumsum(region_mass[::-1])[::-1][k]
  return Curve(bin_edges[k], tps[k], fps[k], cover)


def auroc(c: Curve) -> float:
  if c.tps.size == 0 or c.tps[-1] == 0 or c.fps[-1] == 0:
    return float('nan')
  return float(np.trapezoid(np.r_[0.0, c.tps / c.tps[-1]], np.r_[0.0, c.fps / c.fps[-1]]))


def average_precision(c: Curve) -> float:
  # Step-wise, as sklearn's average_precision_score: sum_n (R_n - R_{n-1}) P_n.
  if c.tps.size == 0 or c.tps[-1] == 0:
    return float('nan')
  recall = c.tps / c.tps[-1]
  precision = c.tps / (c.tps + c.fps)
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(c: Curve) -> float:
  if c.tps.size == 0 or c.tps[-1] == 0:
    return float('nan')
  return float(np.max(2 * c.tps / (c.tps[-1] + c.tps + c.fps)))


def youden(c: Curve) -> float:
  if c.tps.size == 0 or c.tps[-1] == 0 or c.fps[-1] == 0:
    raise ValueError('a threshold needs both defect and non-defect pixels')
  # Same float expression and tie-break (first = highest threshold) as argmax over
  # sklearn's roc_curve, whose prepended (0, 0) point has threshold inf.
  j = np.r_[0.0, c.tps / c.tps[-1] - c.fps / c.fps[-1]]
  i = int(np.argmax(j))
  return float('inf') if i == 0 else float(c.thresholds[i - 1])


def trapezoid_upto(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
  # As MVTec's generic_util.trapezoid: integrate up to x_max, interpolating y linearly there.
  n = int(np.searchsorted(x, x_max, side='right'))  # x[:n] <= x_max
  area = float(np.trapezoid(y[:n], x[:n]))
  if n < x.size and x[n - 1] < x_max:
    y_max = y[n - 1] + (y[n] - y[n - 1]) * (x_max - x[n - 1]) / (x[n] - x[n - 1])
    area += 0.5 * (y[n - 1] + y_max) * (x_max - x[n - 1])
  return area


def pro_points(c: Curve, num_regions: int) -> tuple[np.ndarray, np.ndarray]:
  fpr = np.minimum(np.r_[0.0, c.fps / c.fps[-1]], 1.0)
  pro = np.minimum(np.r_[0.0, c.cover / num_regions], 1.0)  # clip float drift, as MVTec
  return fpr, pro


def aupro(c: Curve, num_regions: int, fpr_limit: float) -> float:
  if c.cover is None or num_regions == 0 or c.fps.size == 0 or c.fps[-1] == 0:
    return float('nan')
  fpr, pro = pro_points(c, num_regions)
  return float(trapezoid_upto(fpr, pro, fpr_limit) / fpr_limit)


def fit_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
  """The paper's threshold: the ROC point with the largest TPR - FPR (Youden's J).

  Args:
    scores: per-pixel scores, any shape (flattened).
    labels: per-pixel ground truth, same size; nonzero = defect.

  Returns:
    The threshold t (predict defect where score >= t). It is one of the scores, the same
    value as roc_curve(labels, scores)'s thresholds[argmax(tpr - fpr)], including inf when
    no threshold beats the empty prediction.

  Raises:
    ValueError: if the labels hold only one class.
  """
  scores = np.asarray(scores, dtype=np.float64).ravel()
  labels = np.asarray(labels).ravel() != 0
  if scores.size != labels.size:
    raise ValueError(f'{scores.size} scores but {labels.size} labels')
  return youden(exact_curve(scores, labels))


def fit_threshold_binned(pos_hist: np.ndarray, neg_hist: np.ndarray,
                         bin_edges: np.ndarray) -> float:
  """fit_threshold from score histograms of defect and non-defect pixels.

  Args:
    pos_hist: [num_bins] counts of defect pixels per score bin.
    neg_hist: [num_bins] counts of non-defect pixels per score bin.
    bin_edges: [num_bins + 1] bin edges, increasing.

  Returns:
    The lower edge of an occupied bin (predict defect where score >= it): the exact Youden
    threshold of the histogrammed pixels among thresholds at bin edges; inf if none beats
    the empty prediction.

  Raises:
    ValueError: if either histogram is empty.
  """
  pos_hist, neg_hist = np.asarray(pos_hist), np.asarray(neg_hist)
  if not pos_hist.shape == neg_hist.shape == (np.size(bin_edges) - 1,):
    raise ValueError('need pos_hist and neg_hist of num_bins and bin_edges of num_bins + 1')
  return youden(binned_curve(pos_hist, neg_hist, np.asarray(bin_edges, dtype=np.float64)))
