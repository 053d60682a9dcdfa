"""Defect maps for new images from a trained workdir: mask, score map and overlay at each image's own size."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from semiseg import curves, evaluate, figures, fileio, report, restore
from semiseg.data import mvtec_tree

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ('file', 'defect_pixel_fraction', 'image_score')


@dataclasses.dataclass
class PredictResult:
  rows: list[dict]  # one per predicted image: SUMMARY_COLUMNS
  failed: list[tuple[str, str]]  # (file, why) of the files that could not be read
  threshold: float
  threshold_source: str


def list_inputs(path: str) -> list[str]:
  """A single file, or every non-hidden file under a folder (sorted, recursive)."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--input {path!r} is neither a file nor a folder.')
  out = []
  for folder, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    out += [os.path.join(folder, f) for f in sorted(files) if not f.startswith('.')]
  return out


def output_stem(file: str, input_path: str) -> str:
  """'in/sub/a.png' under 'in' -> 'sub__a'; a single file -> its stem."""
  rel = os.path.basename(file) if os.path.isfile(input_path) else os.path.relpath(file, input_path)
  return os.path.splitext(rel)[0].replace(os.sep, '__')


def choose_threshold(method, config, workdir: str, data, scorer) -> tuple[float, str]:
  """config.threshold for probability maps; for anomaly scores the workdir's eval.json threshold,
  else the paper's rule (max TPR - FPR) fitted on the labeled images."""
  if method.score_kind != 'anomaly':
    return float(config.threshold), 'config.threshold (probability map)'
  path = os.path.join(workdir, 'eval.json')
  if os.path.exists(path):
    ev = fileio.read_json(path)
    if ev.get('method') == method.name and 'threshold' in ev:
      # null: no score reached a threshold better than predicting nothing (inf; strict JSON has no inf)
      t = math.inf if ev['threshold'] is None else float(ev['threshold'])
      return t, f'{path} ({ev.get("threshold_rule", "?")} rule)'
  t = curves.fit_threshold(scorer(data.labeled.images), evaluate.masks_2d(data.labeled))
  return t, f'fitted on the {len(data.labeled)} labeled images (max TPR - FPR): no eval.json in {workdir}'


def resize_scores(score_HxW: np.ndarray, width: int, height: int) -> np.ndarray:
  """Bilinear resize of a float score map to (height, width)."""
  if score_HxW.shape == (height, width):
    return score_HxW.astype(np.float32)
  return np.asarray(Image.fromarray(score_HxW.astype(np.float32), mode='F')
                    .resize((width, height), Image.BILINEAR), np.float32)


def _chunks(files: list[str], size: int, failed: list) -> Iterator[list[tuple[str, np.ndarray]]]:
  """Readable images in chunks of ``size`` (bounded memory); unreadable ones go to ``failed``."""
  chunk = []
  for f in files:
    try:
      chunk.append((f, mvtec_tree.load_image(f)))
    except (mvtec_tree.LayoutError, OSError, ValueError) as e:
      log.warning('Skipping %s: %s', f, e)
      failed.append((f, str(e).splitlines()[0]))
      continue
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def predict(config, workdir: str, input_path: str, out_dir: str, progress: bool = True) -> PredictResult:
  """Writes ``<stem>_mask.png`` (0/255), ``<stem>_score.png`` (16-bit, score = value / 65535) and
  ``<stem>_overlay.png`` per readable image, plus ``summary.csv`` and ``predict.json``, into ``out_dir``.

  Images are resized to the stored size (textures: 2x the network input, then tiled by the
  Scorer), scored, and the score map resized back bilinearly before thresholding.
  """
  files = list_inputs(input_path)
  run = restore.restore_trained(config, workdir)  # never trains
  method, data, ctx = run.method, run.data, run.ctx
  scorer = evaluate.Scorer(method, run.state, ctx, run.mesh, config.eval_batch_size)
  threshold, source = choose_threshold(method, config, workdir, data, scorer)
  del data  # only needed for a fitted threshold
  log.info('%s threshold %.4f: %s', method.name, threshold, source)
  stored = 2 * config.data.image_size if ctx.texture else config.data.image_size
  vmax = 1.0 if method.score_kind == 'probability' else 2.0 * threshold
  os.makedirs(out_dir, exist_ok=True)
  rows, failed = [], []
  bar = tqdm(total=len(files), desc='predict', unit='img', disable=not progress, dynamic_ncols=True)
  try:
    for chunk in _chunks(files, scorer.batch_size, failed):
      batch = np.stack([mvtec_tree.resize_image(image, stored) for _, image in chunk])
      scores = scorer(batch)
      for (f, image), score in zip(chunk, scores):
        h, w = image.shape[:2]
        full = np.clip(resize_scores(score, w, h), 0.0, 1.0)
        pred = full >= threshold
        stem = os.path.join(out_dir, output_stem(f, input_path))
        figures.write_png(stem + '_mask.png', pred.astype(np.uint8) * 255)
        figures.write_png(stem + '_score.png', (full * 65535 + 0.5).astype(np.uint16))
        overlay = figures.overlay_image(image, full, pred, None, vmax=vmax, min_side=0)
        figures.write_png(stem + '_overlay.png', overlay)
        rows.append({'file': os.path.relpath(f, input_path) if os.path.isdir(input_path) else f,
                     'defect_pixel_fraction': float(pred.mean()), 'image_score': float(score.max())})
      bar.update(len(chunk))
      bar.set_postfix(failed=len(failed))
  finally:
    bar.close()
  report.write_csv(os.path.join(out_dir, 'summary.csv'), rows, SUMMARY_COLUMNS)
  fileio.write_json_atomic(os.path.join(out_dir, 'predict.json'), {
      'workdir': workdir, 'method': method.name, 'threshold': threshold, 'threshold_source': source,
      'num_predicted': len(rows), 'failed': [{'file': f, 'error': e} for f, e in failed]})
  return PredictResult(rows, failed, threshold, source)
