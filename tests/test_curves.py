"""The paper's threshold rule (semiseg.curves) against scikit-learn's ROC curve."""

import numpy as np
import pytest
from sklearn import metrics as skm

from semiseg import curves, metrics

@pytest.mark.parametrize('decimals', [None, 1])
def test_fit_threshold_matches_roc_curve_youden(decimals):
  rng = np.random.default_rng(5)
  for _ in range(20):
    y = rng.random(500) < rng.uniform(0.05, 0.5)
    s = rng.normal(size=500) + rng.uniform(0, 1.5) * y
    if decimals is not None:
      s = np.round(s, decimals)
    fpr, tpr, thr = skm.roc_curve(y, s)
    assert curves.fit_threshold(s, y) == thr[np.argmax(tpr - fpr)]


def test_fit_threshold_returns_inf_when_nothing_beats_empty_prediction():
  y = np.array([0, 1, 0, 1])
  s = np.array([3.0, 2.0, 1.0, 0.0])  # worse than chance at every threshold
  fpr, tpr, thr = skm.roc_curve(y, s)
  assert curves.fit_threshold(s, y) == thr[np.argmax(tpr - fpr)] == np.inf


def test_fit_threshold_binned_is_lower_edge_of_exact_threshold_bin():
  # One distinct score per bin centre: the binned threshold must select the same pixels.
  rng = np.random.default_rng(6)
  s = (rng.integers(0, 100, size=2000) + 0.5) / 100
  y = rng.random(2000) < 0.15 + 0.6 * s
  exact_t = curves.fit_threshold(s, y)
  acc = metrics.SegmentationMetrics(num_bins=100, score_range=(0.0, 1.0))
  acc.update(s.reshape(1, 40, 50), y.reshape(1, 40, 50))
  pos, neg, edges = acc.histograms()
  binned_t = curves.fit_threshold_binned(pos, neg, edges)
  assert binned_t == acc.fit_threshold()
  assert binned_t == pytest.approx(exact_t - 0.005)
  np.testing.assert_array_equal(s >= binned_t, s >= exact_t)
