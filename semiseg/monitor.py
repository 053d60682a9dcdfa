"""What the loop watches besides the loss: a method's score map on the labeled images at log steps (pixel
AUROC of an anomaly score, defect IoU of a probability), and at the end the run's health (a collapse
must not pass silently).

The labeled images are training data (their masks are the labels every U-Net method trains on), so
watching an AE's score map on them uses no test label. ``health.json`` in the workdir records:

  collapsed: the run ended far above its best loss, or its reconstruction no longer depends on its
    input (near-constant), with the numbers in ``warnings``;
  loss_best / loss_end: running medians (5 log steps) of the logged loss, best and last;
  recon_spread: across the labeled images, the per-pixel spread of the reconstruction over that of
    the images (1: follows the images; 0: the same output for every image);
  <monitor>: the last value.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from semiseg import evaluate, fileio, metrics

log = logging.getLogger(__name__)

HEALTH = 'health.json'
# A run ends "far above its best" when its last smoothed loss is this many times its best one.
LOSS_RATIO = 2.0
# Reconstructions spread less than this fraction of the images' own spread count as near-constant.
MIN_RECON_SPREAD = 0.15
SMOOTH = 5  # log steps in the running median of the loss


def spread(images: np.ndarray) -> float:
  """Mean over pixels and channels of the standard deviation across images."""
  return float(np.asarray(images, np.float64).std(axis=0).mean())


class Monitor:
  """Score maps (and reconstructions) of the labeled images for a state, each jitted once."""

  def __init__(self, method, ctx, mesh, labeled, threshold: float = 0.5):
    self.name = method.monitor
    self.images, self.masks = labeled.images, labeled.masks[..., 0].astype(bool)
    batch = min(16, max(1, len(self.images)))
    maps = {self.name: method.score_map, **(method.monitor_maps or {})}
    self.scorers = {name: evaluate.Scorer(method, None, ctx, mesh, batch, fn=fn) for name, fn in maps.items()}
    if method.score_kind == 'anomaly':
      self.measure = metrics.pixel_auroc
    else:
      self.measure = lambda p, m: metrics.defect_iou(p, m, threshold)
    self.recon = (evaluate.Scorer(method, None, ctx, mesh, batch, fn=method.reconstruct)
                  if method.reconstruct is not None else None)
    self.input_spread = spread(self.images.astype(np.float32) / 255.0)

  def __call__(self, state) -> dict[str, float]:
    out = {}
    for name, scorer in self.scorers.items():
      scorer.state = state
      out[name] = self.measure(scorer(self.images), self.masks)
    if self.recon is not None and len(self.images) > 1:
      self.recon.state = state
      out['recon_spread'] = spread(self.recon(self.images)) / max(self.input_spread, 1e-12)
    return out


def running_median(values: list[float], k: int = SMOOTH) -> np.ndarray:
  v = np.asarray(values, np.float64)
  return np.array([np.median(v[max(0, i - k + 1):i + 1]) for i in range(len(v))])


def health(metrics_path: str, name: str | None) -> dict:
  """The run's health from its metrics.jsonl (see the module docstring)."""
  records = []
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      records = [json.loads(line) for line in f if line.strip()]
  losses = [r['loss'] for r in records if r.get('loss') is not None]
  out: dict = {'collapsed': False, 'warnings': []}
  if losses:
    smooth = running_median(losses)
    out['loss_best'], out['loss_end'] = float(smooth.min()), float(smooth[-1])
    if out['loss_end'] > LOSS_RATIO * out['loss_best'] and out['loss_end'] - out['loss_best'] > 1e-6:
      out['warnings'].append(f'the loss ended at {out["loss_end"]:.4g}, {out["loss_end"] / out["loss_best"]:.1f}x '
                             f'its best {out["loss_best"]:.4g} (running median of {SMOOTH} log steps)')
  last = next((r for r in reversed(records) if 'recon_spread' in r), None)
  if last is not None:
    out['recon_spread'] = float(last['recon_spread'])
    if out['recon_spread'] < MIN_RECON_SPREAD:
      out['warnings'].append(f'the reconstruction is near-constant: it spreads {out["recon_spread"]:.3f} of '
                             f'the labeled images\' own spread (below {MIN_RECON_SPREAD})')
  if name is not None:
    values = [(r['step'], r[name]) for r in records if r.get(name) is not None and np.isfinite(r[name])]
    if values:
      out[name] = float(values[-1][1])
  out['collapsed'] = bool(out['warnings'])
  return out


def write_health(workdir: str, name: str | None) -> dict:
  h = health(os.path.join(workdir, 'metrics.jsonl'), name)
  for w in h['warnings']:
    log.warning('%s: %s.', workdir, w)
  fileio.write_json_atomic(os.path.join(workdir, HEALTH), h)
  return h


def read_health(workdir: str) -> dict | None:
  path = os.path.join(workdir, HEALTH)
  return fileio.read_json(path) if os.path.exists(path) else None
