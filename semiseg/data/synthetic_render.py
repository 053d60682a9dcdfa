"""The embedded default dataset: MVTec-layout PNG trees with drawn-in defects and exact masks.

Textures (``brick``, ``grass``, ``gravel``) are random crops of the photographs scikit-image ships
(``skimage.data.brick()`` etc., grayscale 512x512), rescaled, brightness-jittered and tinted.
Objects (``washer``, ``pcb``) are rendered procedurally in colour with pose jitter. Defects are
drawn with their masks: ``scratch`` (1-3 px polylines), ``crack`` (branching random walk), ``hole``
(shows what lies behind), ``stain`` / ``color`` (smooth colour shift, often low contrast) and
``contamination`` (a patch of another photograph). Every image has its own generator seeded by
(seed, category, split, defect type, index), so files are bit-identical for a seed and a change of
counts does not change the other images.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import shutil
import tempfile
import zlib

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import draw

from semiseg.data.categories import SYNTHETIC_CATEGORIES, SYNTHETIC_TEXTURES

# Defect types per category; each includes at least one low-contrast kind (stain / color).
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    'brick': ('crack', 'hole', 'stain', 'contamination'),
    'grass': ('color', 'hole', 'contamination'),
    'gravel': ('scratch', 'stain', 'contamination'),
    'washer': ('scratch', 'crack', 'hole', 'stain'),
    'pcb': ('scratch', 'hole', 'contamination', 'color'),
}
# MVTec's proportions: ~200 train good, ~20 test good, ~15 per defect type.
DEFAULT_COUNTS = {'train': 200, 'test_good': 20, 'defect': 15}
_TINT = {'brick': (1.0, 0.72, 0.58), 'grass': (0.72, 1.0, 0.55), 'gravel': (1.0, 0.96, 0.88)}


def _category_key(name: str) -> int:
  return zlib.crc32(name.encode())  # stable across runs, unlike hash()


@functools.cache
def _photo(name: str) -> np.ndarray:
  return np.asarray(getattr(skdata, name)())


def _resize(a: np.ndarray, size: int, resample=Image.LANCZOS) -> np.ndarray:
  return np.asarray(Image.fromarray(a).resize((size, size), resample))


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
  """Zero-mean, unit-std low-frequency noise (cheap: blur a small field, then upsample)."""
  small = max(4, int(size / max(sigma, 1.0)))
  f = ndimage.gaussian_filter(rng.standard_normal((small, small)), 1.0)
  f = (f - f.mean()) / (f.std() + 1e-8)
  return np.asarray(Image.fromarray(f.astype(np.float32)).resize((size, size), Image.BILINEAR))


# ------------------------------------------------------------------------------------ normal images

def _texture(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
  src = _photo(category).astype(np.float32)
  n = src.shape[0]
  crop = int(n * rng.uniform(0.55, 1.0))  # scale variation up to ~1.8x
  y, x = rng.integers(0, n - crop + 1, size=2)
  patch = src[y:y + crop, x:x + crop]
  if rng.random() < 0.5:
    patch = patch[:, ::-1]
  if category != 'brick' and rng.random() < 0.5:  # brick courses stay horizontal
    patch = patch.T
  g = _resize(np.ascontiguousarray(patch), size).astype(np.float32)
  g = (g - g.mean()) * rng.uniform(0.9, 1.1) + g.mean() * rng.uniform(0.92, 1.08)
  g += 2.0 * rng.standard_normal(g.shape, dtype=np.float32)  # one noise plane: 3x cheaper
  return g[..., None] * np.asarray(_TINT[category], np.float32)


def _background(rng: np.random.Generator, size: int, base: tuple[float, float, float]) -> np.ndarray:
  """A dull cloth-like surface the objects lie on."""
  tone = 12 * _smooth_noise(rng, size, size / 6) + rng.normal(0, 5, (size, size))
  return np.clip(np.asarray(base, np.float32) + tone[..., None], 0, 255)


def _washer(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(image, object region, background) of a metal ring with pose jitter."""
  bg = _background(rng, size, (58, 62, 75))
  c = size / 2 + rng.normal(0, size * 0.025, 2)
  sy, sx = 1 + rng.normal(0, 0.03, 2)  # slight tilt -> ellipse
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  dy, dx = (yy - c[0]) * sy, (xx - c[1]) * sx
  r = np.hypot(dy, dx) / size
  r_out, r_in = 0.36 + rng.normal(0, 0.008), 0.16 + rng.normal(0, 0.006)
  ring = (r < r_out) & (r > r_in)
  light = rng.uniform(0, 2 * np.pi)
  ang = np.arctan2(dy, dx)
  t = (r - r_in) / (r_out - r_in)
  shade = 150 + 45 * np.cos(ang - light) * np.sin(np.pi * np.clip(t, 0, 1)) - 25 * np.abs(t - 0.5)
  brushed = 6 * np.sin(ang * 90 + rng.uniform(0, 6)) + rng.normal(0, 3, (size, size))
  metal = (shade + brushed)[..., None] * np.asarray((1.0, 0.98, 0.93), np.float32)
  # Soft edge: blend over one pixel so the rim is not aliased.
  alpha = np.clip(np.minimum((r_out - r) * size, (r - r_in) * size) + 0.5, 0, 1)[..., None]
  img = alpha * metal + (1 - alpha) * bg
  return img, ring, bg


@functools.cache
def _pcb_layout(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The one board design of a seed (every pcb image shows it, moved a little), as RGB + board mask."""
  rng = np.random.default_rng([seed, _category_key('pcb_layout')])
  img = np.zeros((size, size, 3), np.float32)
  m = int(size * 0.1)
  board = np.zeros((size, size), bool)
  board[m:size - m, m:size - m] = True
  img[board] = (24, 105, 52)
  copper = (196, 160, 70)
  grid = np.linspace(m + size * 0.06, size - m - size * 0.06, 9).astype(int)
  for _ in range(14):  # Manhattan traces between grid points
    y0, x0, y1, x1 = rng.choice(grid, 4)
    w = int(rng.integers(1, 3)) * max(1, size // 128)
    img[min(y0, y1) - w:max(y0, y1) + w + 1, x0 - w:x0 + w + 1] = copper
    img[y1 - w:y1 + w + 1, min(x0, x1) - w:max(x0, x1) + w + 1] = copper
    for (py, px) in ((y0, x0), (y1, x1)):
      rr, cc = draw.disk((py, px), max(2, size // 50), shape=img.shape[:2])
      img[rr, cc] = (205, 205, 200)
  for _ in range(3):  # chips with pins
    h, w = rng.integers(size // 10, size // 5, 2)
    y, x = rng.integers(m + 8, size - m - 8 - max(h, w), 2)
    img[y:y + h, x:x + w] = (25, 25, 28)
    for px in range(x + 3, x + w - 2, max(3, size // 40)):
      img[y - 3:y, px:px + 2] = (200, 200, 195)
      img[y + h:y + h + 3, px:px + 2] = (200, 200, 195)
  return img, board


def _pcb(rng: np.random.Generator, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  layout, board = _pcb_layout(seed, size)
  angle = rng.normal(0, 2.0)
  shift = rng.normal(0, size * 0.015, 2)
  params = dict(angle=angle, resample=Image.BILINEAR, translate=tuple(shift))
  moved = np.stack([np.asarray(Image.fromarray(layout[..., i]).rotate(**params))
                    for i in range(3)], -1)
  region = np.asarray(Image.fromarray(board.astype(np.uint8) * 255).rotate(**params)) > 127
  bg = _background(rng, size, (150, 150, 145))
  img = np.where(region[..., None], moved, bg)
  img = img * rng.uniform(0.93, 1.07) + rng.normal(0, 3, img.shape)
  return img, region, bg


def _normal(category: str, rng: np.random.Generator, size: int, seed: int):
  """(image float HxWx3, region where defects may lie, what a hole shows (array or a callable))."""
  if category in SYNTHETIC_TEXTURES:
    img = _texture(category, rng, size)
    region = np.ones((size, size), bool)
    hole = lambda: np.clip(18 + 6 * _smooth_noise(rng, size, 8)[..., None], 0, 255)
    return img, region, hole
  if category == 'washer':
    return _washer(rng, size)
  if category == 'pcb':
    return _pcb(rng, size, seed)
  raise ValueError(f'Unknown synthetic category {category!r}; valid: {SYNTHETIC_CATEGORIES}.')


# ------------------------------------------------------------------------------------------ defects

def _pick_point(rng: np.random.Generator, region: np.ndarray, margin: int) -> tuple[int, int]:
  """A random point of ``region`` at least ``margin`` pixels from the image border."""
  size = region.shape[0]
  for _ in range(200):  # rejection sampling: cheap, and the regions cover much of the image
    y, x = rng.integers(margin, size - margin, 2)
    if region[y, x]:
      return int(y), int(x)
  ys, xs = np.nonzero(region)
  i = rng.integers(len(ys))
  return int(ys[i]), int(xs[i])


def _blob(rng: np.random.Generator, size: int, center, radius: float) -> np.ndarray:
  """An irregular filled shape: a polygon with noisy radius."""
  n = 24
  radius = max(radius, 2.0)  # tiny images (tests, smoke runs) still get a visible blob
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  rad = radius * np.exp(ndimage.gaussian_filter1d(rng.normal(0, 0.35, n), 1.5, mode='wrap'))
  rad *= np.where(rng.random() < 0.5, 1.0, 1 + 0.6 * np.cos(t - rng.uniform(0, np.pi)))  # elongate
  rr, cc = draw.polygon(center[0] + rad * np.sin(t), center[1] + rad * np.cos(t), (size, size))
  m = np.zeros((size, size), bool)
  m[rr, cc] = True
  return m


def _thicken(points: np.ndarray, size: int, width: int) -> np.ndarray:
  m = np.zeros((size, size), bool)
  pts = np.round(points).astype(int)
  ok = (pts[:, 0] >= 0) & (pts[:, 0] < size) & (pts[:, 1] >= 0) & (pts[:, 1] < size)
  m[pts[ok, 0], pts[ok, 1]] = True
  if width > 1:
    m = ndimage.binary_dilation(m, structure=_disk(width))
  return m


@functools.cache
def _disk(width: int) -> np.ndarray:
  """Structuring element whose dilation turns a 1 px line into a ``width`` px one."""
  if width == 2:
    return np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
  r = width // 2
  yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
  return yy ** 2 + xx ** 2 <= r * r + r


def _polyline(rng: np.random.Generator, size: int, start, length: float) -> np.ndarray:
  """Points of a gently bending polyline of total ``length`` pixels."""
  pts = [np.asarray(start, np.float32)]
  ang = rng.uniform(0, 2 * np.pi)
  for _ in range(int(rng.integers(2, 5))):
    ang += rng.normal(0, 0.35)
    seg = length / 3
    p0 = pts[-1]
    p1 = p0 + seg * np.array([np.sin(ang), np.cos(ang)], np.float32)
    rr, cc = draw.line(int(p0[0]), int(p0[1]), int(p1[0]), int(p1[1]))
    pts.extend(np.stack([rr, cc], -1).astype(np.float32)[1:])
    pts[-1] = p1
  return np.asarray(pts)


def _walk(rng: np.random.Generator, start, steps: int, ang: float) -> np.ndarray:
  turns = np.cumsum(rng.normal(0, 0.25, steps)) + ang
  d = np.stack([np.sin(turns), np.cos(turns)], -1) * rng.uniform(0.8, 1.5)
  return np.asarray(start, np.float32) + np.cumsum(d, 0)


def _crack(rng: np.random.Generator, size: int, start) -> np.ndarray:
  main = _walk(rng, start, int(size * rng.uniform(0.2, 0.35)), rng.uniform(0, 2 * np.pi))
  parts = [main]
  for _ in range(int(rng.integers(1, 4))):  # branches leave the main path at random points
    p = main[rng.integers(len(main))]
    parts.append(_walk(rng, p, int(size * rng.uniform(0.05, 0.15)), rng.uniform(0, 2 * np.pi)))
  return np.concatenate(parts)


def _contamination_source(rng: np.random.Generator, size: int) -> np.ndarray:
  name = ('coffee', 'astronaut', 'chelsea', 'rocket')[rng.integers(4)]
  src = _photo(name)
  c = min(src.shape[:2]) // 3
  y = rng.integers(0, src.shape[0] - c)
  x = rng.integers(0, src.shape[1] - c)
  return _resize(np.ascontiguousarray(src[y:y + c, x:x + c]), size).astype(np.float32)


def _add_defect(kind: str, img: np.ndarray, region: np.ndarray, behind,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Draws one defect of ``kind``; returns (image, bool mask). The mask is never empty."""
  size = img.shape[0]
  for _ in range(20):  # retry until the defect overlaps the allowed region
    center = _pick_point(rng, region, margin=size // 10)
    if kind == 'scratch':
      width = int(rng.integers(1, 4)) * max(1, size // 256)
      m = _thicken(_polyline(rng, size, center, size * rng.uniform(0.15, 0.4)), size, width)
      m &= region
      delta = rng.choice([-1, 1]) * rng.uniform(35, 90)
      out = np.where(m[..., None], img + delta, img)
    elif kind == 'crack':
      width = int(rng.integers(1, 3)) * max(1, size // 256)
      m = _thicken(_crack(rng, size, center), size, width) & region
      out = np.where(m[..., None], img * rng.uniform(0.25, 0.5), img)
    elif kind == 'hole':
      m = _blob(rng, size, center, size * rng.uniform(0.03, 0.07)) & region
      rim = ndimage.binary_dilation(m, iterations=max(1, size // 128)) & ~m & region
      out = np.where(m[..., None], behind() if callable(behind) else behind, img)
      out = np.where(rim[..., None], out * 0.6, out)
    elif kind in ('stain', 'color'):
      m = _blob(rng, size, center, size * rng.uniform(0.04, 0.1)) & region
      alpha = ndimage.gaussian_filter(m.astype(np.float32), size / 128)[..., None]
      # Low contrast on purpose (often 10-25 levels): a fixed brightness threshold must fail.
      strength = rng.uniform(10, 45)
      hue = rng.normal(0, 1, 3)
      hue = hue / (np.linalg.norm(hue) + 1e-8)
      if kind == 'stain':
        hue = -np.abs(hue) * 0.5 - 0.5  # mostly darker, slightly coloured
      out = img + alpha * strength * hue
      m &= alpha[..., 0] > 0.5
    elif kind == 'contamination':
      m = _blob(rng, size, center, size * rng.uniform(0.03, 0.07)) & region
      patch = _contamination_source(rng, size)
      alpha = ndimage.gaussian_filter(m.astype(np.float32), 0.7)[..., None]
      out = alpha * patch + (1 - alpha) * img
      m &= alpha[..., 0] > 0.5
    else:
      raise ValueError(f'Unknown defect kind {kind!r}.')
    if m.sum() >= 4:
      return out, m
  raise RuntimeError(f'Could not place a {kind!r} defect in 20 tries (region too small?).')


# --------------------------------------------------------------------------------------------- tree

def _save(path: str, a: np.ndarray, compress_level: int) -> None:
  Image.fromarray(a).save(path, format='PNG', compress_level=compress_level)


def _to_uint8(img: np.ndarray) -> np.ndarray:
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render(category: str, seed: int, split: str, defect_type: str, index: int,
           size: int) -> tuple[np.ndarray, np.ndarray]:
  """One image (uint8 HxWx3) and mask (uint8 HxWx1, 0/1) of the synthetic set."""
  keys = ('train', 'test')
  types = ('good',) + DEFECT_TYPES[category]
  rng = np.random.default_rng([seed, _category_key(category), keys.index(split),
                               types.index(defect_type), index])
  img, region, behind = _normal(category, rng, size, seed)
  mask = np.zeros((size, size), bool)
  if defect_type != 'good':
    img, mask = _add_defect(defect_type, img, region, behind, rng)
  return _to_uint8(img), mask.astype(np.uint8)[..., None]


def generate_category(root: str, category: str, seed: int = 0, counts: dict | None = None,
                      object_size: int = 256, texture_size: int = 512,
                      compress_level: int = 1) -> None:
  """Writes ``root/category`` (which must not exist yet) in the MVTec layout."""
  counts = {**DEFAULT_COUNTS, **(counts or {})}
  size = texture_size if category in SYNTHETIC_TEXTURES else object_size
  base = os.path.join(root, category)
  groups = [('train', 'good', counts['train']), ('test', 'good', counts['test_good'])]
  groups += [('test', t, counts['defect']) for t in DEFECT_TYPES[category]]
  jobs = []
  for split, defect_type, n in groups:
    os.makedirs(os.path.join(base, split, defect_type))
    if defect_type != 'good':
      os.makedirs(os.path.join(base, 'ground_truth', defect_type))
    jobs += [(split, defect_type, i) for i in range(n)]

  def job(split: str, defect_type: str, i: int) -> None:
    img, mask = render(category, seed, split, defect_type, i, size)
    _save(os.path.join(base, split, defect_type, f'{i:03d}.png'), img, compress_level)
    if defect_type != 'good':
      _save(os.path.join(base, 'ground_truth', defect_type, f'{i:03d}_mask.png'),
            mask[..., 0] * 255, compress_level)

  # Threads: numpy, scipy and PNG encoding release the GIL; each image has its own generator,
  # so the files do not depend on the order the threads run in.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    for f in [pool.submit(job, *j) for j in jobs]:
      f.result()


def generate_tree(root: str, categories=SYNTHETIC_CATEGORIES, seed: int = 0,
                  counts: dict | None = None, object_size: int = 256,
                  texture_size: int = 512, compress_level: int = 1) -> str:
  """Writes an MVTec-layout tree of the synthetic categories under ``root``; returns ``root``.

  ``counts`` overrides ``DEFAULT_COUNTS`` (keys ``train``, ``test_good``, ``defect``);
  ``compress_level`` is PNG's (0 = fastest, for trees read once and deleted). Each category
  is written into a temporary folder beside its target and renamed into place, so an interrupted
  run never leaves a half-written category; an existing category folder is replaced.
  """
  for category in categories:
    if category not in SYNTHETIC_CATEGORIES:
      raise ValueError(f'Unknown synthetic category {category!r}; valid: {SYNTHETIC_CATEGORIES}.')
  os.makedirs(root, exist_ok=True)
  for category in categories:
    tmp = tempfile.mkdtemp(prefix=f'.{category}.', dir=root)
    try:
      generate_category(tmp, category, seed, counts, object_size, texture_size, compress_level)
      target = os.path.join(root, category)
      if os.path.exists(target):
        shutil.rmtree(target)
      os.replace(os.path.join(tmp, category), target)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return root
