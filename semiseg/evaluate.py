"""Running a trained method over a split: score maps, thresholds, metrics per category and defect type."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from semiseg import augment, curves, fileio, metrics, sharding, tensorboard
from semiseg.methods import base

log = logging.getLogger(__name__)


class Scorer:
  """``method.score_map`` (or another per-image map, ``fn``: its reconstruction) jitted once for a fixed
  batch, over any number of images; textures cut into tiles and stitched back. ``fn`` may return a tuple
  of maps (``method.score_with_reconstruction``); the scorer then returns a tuple of arrays."""

  def __init__(self, method: base.Method, state: base.TrainState, ctx: base.MethodContext, mesh,
               batch_size: int, fn=None):
    self.state, self.ctx, self.mesh = state, ctx, mesh
    n = mesh.devices.size
    self.batch_size = max(n, (batch_size + n - 1) // n * n)  # padded to a multiple of the devices
    score_map = fn or method.score_map
    tile = ctx.image_size

    def run(state, images_uint8):
      images = base.to_float(images_uint8)
      if not ctx.texture:
        return score_map(state, images)
      b, h, w, _ = images.shape

      def stitch(out):
        out = out[..., None] if out.ndim == 3 else out
        out = augment.from_tiles(out, b, h, w)
        return out[..., 0] if out.shape[-1] == 1 else out
      out = score_map(state, augment.to_tiles(images, tile))
      return tuple(map(stitch, out)) if isinstance(out, tuple) else stitch(out)
    self._jit = jax.jit(run)
    self._warm: set[int] = set()  # batch sizes already run (compiled)

  def __call__(self, images_uint8_BxHxWx3: np.ndarray) -> np.ndarray:
    """Score maps (float32 numpy) for any number of images, in fixed-size padded batches."""
    outs = []
    for batch, count in self._batches(images_uint8_BxHxWx3):
      out = self._jit(self.state, batch)
      outs.append(tuple(np.asarray(_gather(o))[:count] for o in out) if isinstance(out, tuple)
                  else np.asarray(_gather(out))[:count])
      self._warm.add(self.batch_size)
    if not outs:
      return np.zeros((0,), np.float32)
    return tuple(map(np.concatenate, zip(*outs))) if isinstance(outs[0], tuple) else np.concatenate(outs)

  def _batches(self, images: np.ndarray) -> Iterator[tuple[Any, int]]:
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      count = len(chunk)
      if count < self.batch_size:
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - count,) + chunk.shape[1:], chunk.dtype)])
      yield _global_rows(chunk, self.mesh), count

  def time_per_image(self, images_uint8: np.ndarray, batch_size: int, repeats: int = 3,
                     budget_s: float = 2.0) -> float:
    """Milliseconds per image at ``batch_size`` once compiled: the median of ``repeats`` timed runs,
    fewer when they pass ``budget_s`` seconds in all (at least one). A batch size this scorer has
    already run (its own, after scoring a split) is not warmed up again: for AnoGAN's latent search on
    a texture one run is ~10 s, and the warm-up and three repeats were a third of its cell's time."""
    chunk = images_uint8[:batch_size]
    if len(chunk) < batch_size:
      chunk = np.resize(chunk, (batch_size,) + chunk.shape[1:])
    global_rows = batch_size % self.mesh.devices.size == 0
    x = _global_rows(chunk, self.mesh) if global_rows else jnp.asarray(chunk)
    if not (global_rows and batch_size in self._warm):
      jax.block_until_ready(self._jit(self.state, x))  # warm-up (compiles this batch size)
    times = []
    while len(times) < max(1, repeats) and (not times or sum(times) < budget_s):
      t0 = time.perf_counter()
      jax.block_until_ready(self._jit(self.state, x))
      times.append(time.perf_counter() - t0)
    if global_rows:
      self._warm.add(batch_size)
    return 1000.0 * float(np.median(times)) / batch_size


def _global_rows(batch: np.ndarray, mesh):
  """Every process holds the whole split; each contributes its own rows of the global batch."""
  n, p = len(batch), jax.process_count()
  local = batch[jax.process_index() * n // p:(jax.process_index() + 1) * n // p]
  return sharding.to_global(local, mesh)


def _gather(x):
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(x, tiled=True)


def masks_2d(split) -> np.ndarray:
  return split.masks[..., 0].astype(bool)


def metrics_at(scores: np.ndarray, split, threshold: float, num_bins: int) -> tuple[dict, dict]:
  """(overall, per defect type) metrics of a split's score maps at a threshold, streamed in batches."""
  acc = metrics.SegmentationMetrics(threshold=threshold, num_bins=num_bins, score_range=(0.0, 1.0))
  masks = masks_2d(split)
  for start in range(0, len(scores), 64):
    acc.update(scores[start:start + 64], masks[start:start + 64], split.defect_types[start:start + 64])
  return acc.result(), acc.result_per_defect_type()


def mean_image(split) -> np.ndarray:
  """Per-pixel mean of a split's images as floats in [0, 1] ([S, S, 3])."""
  return split.images.astype(np.float64).mean(axis=0).astype(np.float32) / 255.0


def trivial_difference(images_uint8: np.ndarray, mean_HxWx3: np.ndarray, channels: str = 'mean') -> np.ndarray:
  """|I - M| reduced over channels (mean or max, as the AE's score map: config.model.diff_channels): the
  difference image of a 'model' that always answers M."""
  return base.reduce_channels(np.abs(images_uint8.astype(np.float32) / 255.0 - mean_HxWx3), channels)


THRESHOLD_FREE_D = ('pixel_auroc', 'pixel_ap', 'aupro')


def trivial_quality(data, num_bins: int, channels: str = 'mean') -> dict:
  """Threshold-free metrics of |I - M|, M the mean of the unlabeled images, on the test split and the
  labeled images ('train'): the yardstick an AE's difference image must beat."""
  mean = mean_image(data.unlabeled)
  out = {}
  for name, split in (('test', data.test), ('train', data.labeled)):
    if not len(split):  # no labeled image (config.data.k_labeled=0)
      continue
    res, _ = metrics_at(trivial_difference(split.images, mean, channels), split, 0.5, num_bins)
    out[name] = {k: res[k] for k in THRESHOLD_FREE_D}
  return out


# Variance of uint8 rounding, (1/255)^2 / 12 per channel: added to the colour covariance, so a category
# whose normal colours vary along fewer than 3 directions (a gray photograph times a tint) stays invertible.
ROUNDING_VARIANCE = (1.0 / 255.0) ** 2 / 12.0


def colour_whitener(images_uint8: np.ndarray, mean_HxWx3: np.ndarray, chunk: int = 16) -> np.ndarray:
  """W = S^(-1/2) ([3, 3]), S the covariance of the colour deviations I - M over every pixel of
  ``images_uint8`` (float64, accumulated in chunks of images) plus the rounding variance."""
  s, n = np.zeros((3, 3)), 0
  for start in range(0, len(images_uint8), chunk):
    d = (images_uint8[start:start + chunk].astype(np.float64) / 255.0 - mean_HxWx3).reshape(-1, 3)
    s += d.T @ d
    n += len(d)
  cov = s / max(n, 1) + ROUNDING_VARIANCE * np.eye(3)
  eigval, eigvec = np.linalg.eigh(cov)
  return (eigvec / np.sqrt(eigval)) @ eigvec.T


def colour_distance(images_uint8: np.ndarray, mean_HxWx3: np.ndarray, whitener_3x3: np.ndarray) -> np.ndarray:
  """Each pixel's Mahalanobis distance r = |W (I - M)| from the mean image, mapped to [0, 1) as r / (1 + r)
  (monotone, so rankings are r's) for the metrics' [0, 1] histograms ([N, H, W])."""
  d = images_uint8.astype(np.float32) / 255.0 - mean_HxWx3.astype(np.float32)
  r = np.sqrt(np.square(d @ whitener_3x3.T.astype(np.float32)).sum(-1))
  return r / (1.0 + r)


def colour_quality(data, num_bins: int) -> dict:
  """Threshold-free metrics of the colour yardstick, |W (I - M)|, on the test split and the labeled
  images: how far defects stand out by their colour alone, seen against the normal images' colour
  spread. Where normal colours vary along one direction (the embedded textures), any defect that adds
  a colour is an outlier here, with no learning at all."""
  mean = mean_image(data.unlabeled)
  w = colour_whitener(data.unlabeled.images, mean)
  out = {}
  for name, split in (('test', data.test), ('train', data.labeled)):
    if not len(split):  # no labeled image (config.data.k_labeled=0)
      continue
    res, _ = metrics_at(colour_distance(split.images, mean, w), split, 0.5, num_bins)
    out[name] = {k: res[k] for k in THRESHOLD_FREE_D}
  return out


def evaluate(method: base.Method, state: base.TrainState, data, ctx: base.MethodContext, mesh, config,
             workdir: str | None = None, time_it: bool = True,
             score_sink: Callable[[str, np.ndarray], None] | None = None, extra: dict | None = None) -> dict:
  """Metrics of a trained method on the test split (and on its labeled training images).

  Probability methods use ``config.threshold``. Anomaly-score methods (AE, PCA, AnoGAN) fit the
  threshold on the labeled images by the paper's rule (``threshold_rule='labeled'``); the test-fitted
  ``oracle`` threshold is reported alongside, under that name, never as the main number.
  ``score_sink(split_name, scores_NxHxW)``, when given, sees the 'test' and 'train' score maps
  (figures and overlays without scoring a second time), and 'test_reconstruction' ([N, H, W, 3]) from
  a method with ``score_with_reconstruction``. A method with a difference image to watch
  (``method.monitor``: the AE) also gets ``trivial``, the same metrics of |I - M|, and ``colour``, those of
  the colour yardstick |W (I - M)| (``colour_quality``). ``extra`` is merged
  into the result (e.g. the training health).
  """
  num_bins = int(config.get('num_bins', 1000))
  # A method whose reconstruction is a search (AnoGAN) scores and reconstructs in one pass: its
  # reconstruction error, and Figure 6's reconstruction, are those its scores came from, at one search's cost.
  joint = method.score_with_reconstruction
  scorer = Scorer(method, state, ctx, mesh, config.eval_batch_size, fn=joint)
  test_recon = None
  if joint is not None:
    test_scores, test_recon = scorer(data.test.images)
    train_scores, _ = scorer(data.labeled.images)
  else:
    test_scores = scorer(data.test.images)
    train_scores = scorer(data.labeled.images)
  if score_sink is not None:
    score_sink('test', test_scores)
    score_sink('train', train_scores)
    if test_recon is not None:
      score_sink('test_reconstruction', test_recon)
  rule = config.threshold_rule if method.score_kind == 'anomaly' else 'fixed'
  if rule not in ('labeled', 'oracle', 'fixed'):
    raise ValueError(f"config.threshold_rule must be 'labeled', 'oracle' or 'fixed', got {rule!r}.")
  if rule == 'labeled' and not len(data.labeled):
    raise ValueError(f'config.threshold_rule=\'labeled\' fits {method.name}\'s threshold on the labeled images, but '
                     'there are none (config.data.k_labeled=0); set config.threshold_rule=oracle (reported under '
                     'that name) or fixed (config.threshold).')
  if rule == 'labeled':  # the paper's rule: the ROC point with the largest TPR - FPR
    threshold = curves.fit_threshold(train_scores, masks_2d(data.labeled))
  elif rule == 'oracle':
    threshold = curves.fit_threshold(test_scores, masks_2d(data.test))
  else:
    threshold = float(config.threshold)
  test, per_type = metrics_at(test_scores, data.test, threshold, num_bins)
  # No labeled image (config.data.k_labeled=0, zero-label mode): no training metrics, train is null.
  train = metrics_at(train_scores, data.labeled, threshold, num_bins)[0] if len(data.labeled) else None
  out = {'method': method.name, 'dataset': config.data.name, 'category': config.data.category,
         'seed': int(config.seed), 'score_kind': method.score_kind, 'threshold_rule': rule,
         'threshold': threshold, 'test': test, 'train': train, 'per_defect_type': per_type,
         'num_test_images': len(data.test), 'num_labeled_images': len(data.labeled),
         'test_tiles_per_image': (data.test.images.shape[1] // ctx.image_size) ** 2 if ctx.texture else 1,
         'num_unlabeled_images': len(data.unlabeled)}
  if method.score_kind == 'anomaly' and rule != 'oracle':
    oracle_t = curves.fit_threshold(test_scores, masks_2d(data.test))
    out['oracle'] = {'threshold': oracle_t, 'test': metrics_at(test_scores, data.test, oracle_t, num_bins)[0]}
  good = np.array([t == 'good' for t in data.test.defect_types], bool)
  if method.score_kind == 'anomaly' and method.reconstruct is not None and good.any():
    # How well the model reproduces the category (AnoGAN's generator against the AE's, say): the mean
    # |I - reconstruction| over the normal test images' pixels and channels. Not the score map, whose
    # blur and channel reduction (config.model.diff_blur, diff_channels) belong to the score.
    images = data.test.images[good]
    recon = (test_recon[good] if test_recon is not None else
             Scorer(method, state, ctx, mesh, config.eval_batch_size, fn=method.reconstruct)(images))
    out['recon_error_good'] = float(np.abs(images.astype(np.float32) / 255.0 - recon).mean())
  del test_recon
  if method.monitor is not None and method.score_kind == 'anomaly':  # D's yardstick: the AE, not Mean Teacher
    out['trivial'] = trivial_quality(data, num_bins, config.model.diff_channels)
    out['colour'] = colour_quality(data, num_bins)
  out.update(method.info or {})
  out.update(extra or {})
  if time_it and len(data.test):
    out['ms_per_image'] = {
        'batch_1': scorer.time_per_image(data.test.images, 1) if mesh.devices.size == 1 else None,
        f'batch_{scorer.batch_size}': scorer.time_per_image(data.test.images, scorer.batch_size),
        'device': str(jax.devices()[0].platform)}
  if workdir is not None and jax.process_index() == 0:
    step = int(jax.device_get(state.step)) if state is not None else 0  # a stateless scorer: step 0
    tensorboard.write_evaluation(workdir, out, data.test, test_scores, step)
    fileio.write_json_atomic(os.path.join(workdir, 'eval.json'), out)
  return out


def evaluate_run(run, **kwargs) -> dict:
  """``evaluate`` of a trained or restored run record (semiseg/run.py: ``Run.state`` set) in its workdir."""
  return evaluate(run.method, run.state, run.data, run.ctx, run.mesh, run.config, run.workdir, **kwargs)


def format_table(results: list[dict]) -> str:
  """A Markdown table of the main numbers of several eval results."""
  lines = ['| category | method | threshold | defect IoU | mean IoU (2-class) | Dice | MAE px | pixel AUROC | AUPRO |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in results:
    t = r['test']
    lines.append(f"| {r['category']} | {r['method']} | {r['threshold']:.3f} ({r['threshold_rule']}) | "
                 f"{t['defect_iou']:.3f} | {t['miou']:.3f} | {t['dice']:.3f} | {t['mae_pixels']:.0f} | "
                 f"{t['pixel_auroc']:.3f} | {t['aupro']:.3f} |")
  return '\n'.join(lines)
