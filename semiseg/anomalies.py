"""Synthetic anomalies with exact masks, drawn on device from a PRNG key, to train segmenters on.

Each kind turns a normal image (float, [0, 1], H x W x C) into a defective one and returns the mask of
the pixels it changed. Three kinds, each after a published recipe (the code here is our own):

  'appearance'  a region shaped by thresholded low-frequency value noise (sums of upsampled random
                grids at a few octaves), filled with the content of another image of the unlabeled
                set, randomly rotated, flipped, scaled, shifted and colour-jittered, blended in with
                an opacity drawn from ``opacity_range`` (DRAEM's 1 - beta). Imitates stains,
                contamination, foreign material, colour and texture defects. (DRAEM, Zavrtanik,
                Kristan and Skocaj, ICCV 2021; its noise-shaped mask, foreign source and blend.)
  'structure'   a rectangle of the image itself, cut out, rotated by any angle and pasted elsewhere;
                half of the draws are long thin "scars". Imitates misplaced or missing parts and
                crack- or scratch-like discontinuities. (CutPaste and CutPaste-Scar, Li, Sohn, Yoon
                and Pfister, CVPR 2021.)
  'intensity'   a smooth elliptical bump that blends the image towards white (brighter) or black
                (darker): weight a * max(g - e^-2, 0) / (1 - e^-2) with g a rotated anisotropic
                Gaussian, so it vanishes exactly at two sigmas. Imitates dents, shading, glare and
                burn marks. (A smooth feature-free perturbation in the spirit of SuperSimpleNet,
                Rolih, Fucka and Skocaj, ICPR 2024, here in image space.)

The mask rule, the same for every kind: a kind draws a target image T and a weight map w in [0, 1]
that is exactly 0 outside its region; the blend is B = x + w (T - x). A pixel is in the mask iff
max over channels |B - x| > ``spec.min_change`` (default 1/255, one grey level of a uint8 image); every
other pixel is returned as x, bit for bit. So the mask is exactly the set of changed pixels, and each
changed pixel moved by more than min_change. (Where the pasted content equals the image, e.g. dark
background pasted on dark background, nothing changed and the mask says so; a draw can be empty.)

This module shares no code with the embedded test-set renderer (``semiseg/data/synthetic_render.py``)
and imports nothing from it, so the embedded test defects stay unseen in kind (a test checks the
imports). Everything is pure JAX: jit and vmap it; the same key gives the same anomaly, so a train step
keyed by (seed, step) stays exactly resumable.

  images, masks_BxHxWx1 = synthesize_batch(key, images_BxHxWxC, sources_BxHxWxC, spec, strength)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from semiseg import augment

KINDS = ('appearance', 'structure', 'intensity')
# Cells per side of the value-noise grids; the coarsest octave used is drawn from the first three,
# so regions are blobs of about 1/2 to 1/8 of the side, roughened by the finer octaves.
_NOISE_CELLS = (2, 4, 8, 16)
_NOISE_OCTAVES = 3
_BUMP_CUT = math.exp(-2.0)  # the Gaussian's value at two sigmas, where the bump ends


def _check_range(name: str, r: tuple[float, float], lo: float, hi: float) -> None:
  if len(r) != 2 or not lo <= r[0] <= r[1] <= hi:
    raise ValueError(f'AnomalySpec.{name} must be (min, max) with {lo} <= min <= max <= {hi}, '
                     f'got {r!r}.')


@dataclasses.dataclass(frozen=True)
class AnomalySpec:
  """What the generator draws; hashable, so it can be a static argument of jit.

  Areas are fractions of the image; lengths (sigma, scar sides) fractions of its shorter side.
  """
  kinds: tuple[str, ...] = KINDS
  min_change: float = 1 / 255  # a pixel is in the mask iff some channel moved by more than this
  # (a) appearance
  area_range: tuple[float, float] = (0.01, 0.15)  # share of pixels above the noise threshold
  opacity_range: tuple[float, float] = (0.3, 1.0)  # weight of the foreign content (DRAEM: 1 - beta)
  zoom_range: tuple[float, float] = (0.7, 1.4)  # scale of the foreign content, log-uniform
  # (b) structure
  patch_area_range: tuple[float, float] = (0.01, 0.06)  # box patches, aspect ratio in [1/3, 3]
  scar_prob: float = 0.5
  scar_length_range: tuple[float, float] = (0.25, 0.5)
  scar_width_range: tuple[float, float] = (0.025, 0.06)  # at least 2 px
  # (c) intensity
  bump_sigma_range: tuple[float, float] = (0.03, 0.12)  # each axis; the bump ends at 2 sigma
  bump_amplitude_range: tuple[float, float] = (0.15, 0.5)  # peak weight towards white / black

  def __post_init__(self):
    if not self.kinds or any(k not in KINDS for k in self.kinds):
      raise ValueError(f'AnomalySpec.kinds must be a non-empty tuple of {KINDS}, got {self.kinds!r}.')
    if not isinstance(self.kinds, tuple):
      raise TypeError(f'AnomalySpec.kinds must be a tuple (hashable), got {type(self.kinds)}.')
    if not 0 <= self.min_change < 1:
      raise ValueError(f'AnomalySpec.min_change must be in [0, 1), got {self.min_change}.')
    if not 0 <= self.scar_prob <= 1:
      raise ValueError(f'AnomalySpec.scar_prob must be in [0, 1], got {self.scar_prob}.')
    _check_range('area_range', self.area_range, 0.0, 1.0)
    _check_range('opacity_range', self.opacity_range, 0.0, 1.0)
    _check_range('zoom_range', self.zoom_range, 1e-3, 1e3)
    _check_range('patch_area_range', self.patch_area_range, 0.0, 0.2)
    _check_range('scar_length_range', self.scar_length_range, 0.0, 0.7)
    _check_range('scar_width_range', self.scar_width_range, 0.0, 0.2)
    _check_range('bump_sigma_range', self.bump_sigma_range, 0.0, 0.24)
    _check_range('bump_amplitude_range', self.bump_amplitude_range, 0.0, 1.0)


class PatchParams(NamedTuple):
  """One 'structure' draw: output pixel o inside the pasted footprint reads the image at
  src_centre + A (o - dst_centre), A = [[cos, sin], [-sin, cos]] (augment.py's convention); the
  footprint is |A (o - dst_centre)| < size / 2 per axis, i.e. the source rectangle of size (rows,
  cols) centred at src_centre, rotated into place."""
  src_centre: jax.Array  # [2] (row, col)
  dst_centre: jax.Array  # [2]
  size: jax.Array  # [2] rows, cols of the source rectangle, in pixels
  angle: jax.Array  # radians
  opacity: jax.Array  # weight of the pasted content inside the footprint


class BumpParams(NamedTuple):
  """One 'intensity' draw: weight a * max(g - e^-2, 0) / (1 - e^-2), g = exp(-d^2 / 2) with
  d^2 = (u_row / sigma_row)^2 + (u_col / sigma_col)^2, u = A (o - centre); the target is white when
  ``brighten`` else black."""
  centre: jax.Array  # [2] (row, col)
  sigma: jax.Array  # [2] in pixels, along the rotated axes
  angle: jax.Array  # radians
  amplitude: jax.Array  # peak weight in [0, 1]
  brighten: jax.Array  # bool


def _uniforms(key: jax.Array, n: int) -> jax.Array:
  """[n] float32 uniforms in [0, 1): a sampler's whole draw in one call (each jax.random call
  compiles its own threefry, which dominated compile time)."""
  return jax.random.uniform(key, (n,), jnp.float32)


def _lerp(u: jax.Array, lo: float, hi: float) -> jax.Array:
  return lo + u * (hi - lo)


def _rotation(angle: jax.Array) -> jax.Array:
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  return jnp.stack([jnp.stack([cos, sin]), jnp.stack([-sin, cos])]).astype(jnp.float32)


def _offsets(hw: tuple[int, int], centre: jax.Array, angle: jax.Array) -> jax.Array:
  """[H, W, 2] A (o - centre) for every pixel o = (row, col): offsets in the rotated frame."""
  rows, cols = jnp.meshgrid(jnp.arange(hw[0], dtype=jnp.float32), jnp.arange(hw[1], dtype=jnp.float32),
                            indexing='ij')
  off = jnp.stack([rows - centre[0], cols - centre[1]], -1)
  return jnp.einsum('ij,hwj->hwi', _rotation(angle), off)


def _blend(image_HxWxC: jax.Array, target_HxWxC: jax.Array, weight_HxW: jax.Array,
           min_change: float) -> tuple[jax.Array, jax.Array]:
  """x + w (T - x) where that moves some channel by more than min_change, else x; and that mask."""
  blended = image_HxWxC + weight_HxW[..., None].astype(image_HxWxC.dtype) * (target_HxWxC - image_HxWxC)
  changed_HxW = jnp.max(jnp.abs(blended - image_HxWxC), axis=-1) > min_change
  out = jnp.where(changed_HxW[..., None], blended, image_HxWxC)
  return out, changed_HxW[..., None].astype(jnp.float32)


def _check_image(image: jax.Array, name: str = 'image') -> None:
  if image.ndim != 3 or not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f'{name} must be a float H x W x C array in [0, 1], got {image.shape} {image.dtype}.')


# --- (a) appearance --------------------------------------------------------------------------------

def _upsample_matrix(cells: int, n: int) -> np.ndarray:
  """[n, cells + 1] weights that resample a grid of cells + 1 nodes over n pixel centres with
  Perlin's fade curve 6t^5 - 15t^4 + 10t^3 (value noise, C2 between nodes); numpy, static."""
  pos = (np.arange(n) + 0.5) * cells / n
  j = np.minimum(np.floor(pos).astype(int), cells - 1)
  t = pos - j
  fade = t * t * t * (t * (6 * t - 15) + 10)
  m = np.zeros((n, cells + 1), np.float32)
  m[np.arange(n), j] = 1 - fade
  m[np.arange(n), j + 1] = fade
  return m


def lowfreq_noise(key: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """[H, W] float32 value noise: grids of 2..16 cells with values uniform in [-1, 1], upsampled to
  H x W and summed with amplitudes 1, 1/2, 1/4 from a random coarsest octave (Perlin-like, as DRAEM's
  masks)."""
  sizes = [(c + 1) ** 2 for c in _NOISE_CELLS]
  u = _uniforms(key, 1 + sum(sizes))  # one draw: each random call adds its own compiled threefry
  base = jnp.floor(u[0] * (len(_NOISE_CELLS) - _NOISE_OCTAVES + 1))
  starts = np.cumsum([1] + sizes)
  total = jnp.zeros(hw, jnp.float32)
  for i, cells in enumerate(_NOISE_CELLS):
    grid = 2 * u[starts[i]:starts[i + 1]].reshape(cells + 1, cells + 1) - 1
    amp = jnp.where((i >= base) & (i < base + _NOISE_OCTAVES), jnp.exp2(base - i), 0.0)
    field = _upsample_matrix(cells, hw[0]) @ grid @ _upsample_matrix(cells, hw[1]).T
    total = total + amp * field
  return total


def noise_region(key: jax.Array, hw: tuple[int, int], area: jax.Array) -> jax.Array:
  """[H, W] bool: the round(area * H * W) pixels (at least 1) where lowfreq_noise is largest."""
  noise = lowfreq_noise(key, hw)
  n = hw[0] * hw[1]
  keep = jnp.clip(jnp.round(area * n).astype(jnp.int32), 1, n)
  threshold = jnp.sort(noise.reshape(-1))[n - keep]
  return noise >= threshold


def _foreign(u: jax.Array, source_HxWxC: jax.Array, out_hw: tuple[int, int],
             zoom_range: tuple[float, float]) -> jax.Array:
  """The source warped (any rotation, flips, zoom about the centre, a shift of up to half a side;
  mirrored borders, so no empty corners) and colour-jittered, from 9 uniforms ``u``."""
  in_hw = jnp.array(source_HxWxC.shape[:2], jnp.float32)
  flips = jnp.where(u[1:3] < 0.5, -1.0, 1.0)
  zoom = jnp.exp(_lerp(u[3], *map(math.log, zoom_range)))
  a = _rotation(_lerp(u[0], -math.pi, math.pi)) * flips[None, :] / zoom
  c_out = (jnp.array(out_hw, jnp.float32) - 1) / 2
  shift = (in_hw - 1) / 2 + _lerp(u[4:6], -0.5, 0.5) * in_hw - a @ c_out
  m = jnp.eye(3, dtype=jnp.float32).at[:2, :2].set(a).at[:2, 2].set(shift)
  warped = augment.warp(source_HxWxC, m, out_hw, 1, 'reflect')
  mean = jnp.mean(warped)
  jittered = jnp.clip((warped - mean) * _lerp(u[6], 0.6, 1.4) + mean + _lerp(u[7], -0.2, 0.2), 0.0, 1.0)
  return jnp.where(u[8] < 0.2, 1.0 - jittered, jittered).astype(warped.dtype)


def appearance(key: jax.Array, image_HxWxC: jax.Array, source_HxWxC: jax.Array,
               spec: AnomalySpec = AnomalySpec(), strength: float | jax.Array = 1.0
               ) -> tuple[jax.Array, jax.Array]:
  """(a): a noise-shaped region blended with another image's warped content; -> (image, mask_HxWx1).

  Opacity is uniform in spec.opacity_range times strength, clipped to [0, 1], constant in the region.
  """
  _check_image(image_HxWxC)
  _check_image(source_HxWxC, 'source')
  hw = image_HxWxC.shape[:2]
  k_region, k_draw = jax.random.split(key)
  u = _uniforms(k_draw, 11)
  region_HxW = noise_region(k_region, hw, _lerp(u[0], *spec.area_range))
  foreign = _foreign(u[2:], source_HxWxC.astype(image_HxWxC.dtype), hw, spec.zoom_range)
  opacity = jnp.clip(_lerp(u[1], *spec.opacity_range) * strength, 0.0, 1.0)
  return _blend(image_HxWxC, foreign, jnp.where(region_HxW, opacity, 0.0), spec.min_change)


# --- (b) structure ---------------------------------------------------------------------------------

def sample_patch(key: jax.Array, hw: tuple[int, int], spec: AnomalySpec = AnomalySpec(),
                 strength: float | jax.Array = 1.0) -> PatchParams:
  """A box (area in spec.patch_area_range, aspect in [1/3, 3]) or, with spec.scar_prob, a scar;
  any angle; both rectangles wholly inside the image (the pasted one after rotation)."""
  h, w = hw
  side = float(min(h, w))
  u = _uniforms(key, 10)
  area = _lerp(u[0], *spec.patch_area_range) * h * w
  half_log = 0.5 * _lerp(u[1], -math.log(3), math.log(3))
  box = jnp.sqrt(area) * jnp.stack([jnp.exp(half_log), jnp.exp(-half_log)])
  length = _lerp(u[2], *spec.scar_length_range) * side
  width = jnp.maximum(_lerp(u[3], *spec.scar_width_range) * side, 2.0)
  size = jnp.where(u[4] < spec.scar_prob, jnp.stack([length, width]), box)
  size = jnp.minimum(size, 0.9 * side)
  limit = jnp.array([h - 1, w - 1], jnp.float32)
  src = size / 2 + u[5:7] * jnp.maximum(limit - size, 0.0)
  reach = jnp.minimum(jnp.linalg.norm(size) / 2, limit / 2)  # half-diagonal: any rotation fits
  dst = reach + u[7:9] * (limit - 2 * reach)
  angle = _lerp(u[9], -math.pi, math.pi)
  opacity = jnp.clip(jnp.asarray(strength, jnp.float32), 0.0, 1.0)
  return PatchParams(src, dst, size, angle, opacity)


def paste_patch(image_HxWxC: jax.Array, params: PatchParams, min_change: float = 1 / 255
                ) -> tuple[jax.Array, jax.Array]:
  """Pastes the rotated source rectangle of ``params`` (bilinear, mirrored borders); -> (image, mask)."""
  _check_image(image_HxWxC)
  hw = image_HxWxC.shape[:2]
  a = _rotation(params.angle)
  shift = params.src_centre - a @ params.dst_centre
  m = jnp.eye(3, dtype=jnp.float32).at[:2, :2].set(a).at[:2, 2].set(shift)
  moved = augment.warp(image_HxWxC, m, hw, 1, 'reflect')
  u = _offsets(hw, params.dst_centre, params.angle)
  inside_HxW = jnp.all(jnp.abs(u) < params.size / 2, axis=-1)
  return _blend(image_HxWxC, moved, jnp.where(inside_HxW, params.opacity, 0.0), min_change)


def structure(key: jax.Array, image_HxWxC: jax.Array, spec: AnomalySpec = AnomalySpec(),
              strength: float | jax.Array = 1.0) -> tuple[jax.Array, jax.Array]:
  """(b): a patch of the image moved and rotated elsewhere (opacity = strength clipped to [0, 1])."""
  _check_image(image_HxWxC)
  return paste_patch(image_HxWxC, sample_patch(key, image_HxWxC.shape[:2], spec, strength),
                     spec.min_change)


# --- (c) intensity ---------------------------------------------------------------------------------

def sample_bump(key: jax.Array, hw: tuple[int, int], spec: AnomalySpec = AnomalySpec(),
                strength: float | jax.Array = 1.0) -> BumpParams:
  """Sigmas per axis in spec.bump_sigma_range, any angle, the 2-sigma ellipse inside the image;
  amplitude uniform in spec.bump_amplitude_range times strength; brighter or darker at 1/2."""
  side = float(min(hw))
  u = _uniforms(key, 7)
  sigma = _lerp(u[0:2], *spec.bump_sigma_range) * side
  limit = jnp.array([hw[0] - 1, hw[1] - 1], jnp.float32)
  reach = jnp.minimum(2 * jnp.max(sigma), limit / 2)
  centre = reach + u[2:4] * (limit - 2 * reach)
  angle = _lerp(u[4], -math.pi, math.pi)
  amplitude = jnp.clip(_lerp(u[5], *spec.bump_amplitude_range) * strength, 0.0, 1.0)
  return BumpParams(centre, sigma, angle, amplitude, u[6] < 0.5)


def bump_weight(hw: tuple[int, int], params: BumpParams) -> jax.Array:
  """[H, W] float32 weight of a bump, exactly 0 from two sigmas on (BumpParams gives the formula)."""
  u = _offsets(hw, params.centre, params.angle)
  g = jnp.exp(-0.5 * jnp.sum(jnp.square(u / params.sigma), axis=-1))
  return params.amplitude * jnp.maximum(g - _BUMP_CUT, 0.0) / (1.0 - _BUMP_CUT)


def apply_bump(image_HxWxC: jax.Array, params: BumpParams, min_change: float = 1 / 255
               ) -> tuple[jax.Array, jax.Array]:
  """Blends the image towards white or black by the bump's weight; -> (image, mask_HxWx1)."""
  _check_image(image_HxWxC)
  target = jnp.where(params.brighten, 1.0, 0.0).astype(image_HxWxC.dtype)
  return _blend(image_HxWxC, jnp.broadcast_to(target, image_HxWxC.shape),
                bump_weight(image_HxWxC.shape[:2], params), min_change)


def intensity(key: jax.Array, image_HxWxC: jax.Array, spec: AnomalySpec = AnomalySpec(),
              strength: float | jax.Array = 1.0) -> tuple[jax.Array, jax.Array]:
  """(c): a smooth local brightening or darkening."""
  _check_image(image_HxWxC)
  return apply_bump(image_HxWxC, sample_bump(key, image_HxWxC.shape[:2], spec, strength),
                    spec.min_change)


# --- the mix ---------------------------------------------------------------------------------------

def _kind_fn(name: str, spec: AnomalySpec):
  """(key, image, source, strength) -> (image, mask) for one kind."""
  if name == 'appearance':
    return lambda k, x, s, a: appearance(k, x, s, spec, a)
  if name == 'structure':
    return lambda k, x, s, a: structure(k, x, spec, a)
  return lambda k, x, s, a: intensity(k, x, spec, a)


def kind_index(key: jax.Array, spec: AnomalySpec = AnomalySpec()) -> jax.Array:
  """int32 index into spec.kinds of the kind ``synthesize`` draws for this key (uniform); vmap it
  over jax.random.split(key, B) for the kinds of a ``synthesize_batch`` call, e.g. to log their shares."""
  u = _uniforms(jax.random.split(key)[0], 1)[0]
  return jnp.minimum(jnp.floor(u * len(spec.kinds)), len(spec.kinds) - 1).astype(jnp.int32)


def synthesize(key: jax.Array, image_HxWxC: jax.Array, source_HxWxC: jax.Array,
               spec: AnomalySpec = AnomalySpec(), strength: float | jax.Array = 1.0
               ) -> tuple[jax.Array, jax.Array]:
  """One anomaly of a kind drawn uniformly from spec.kinds; -> (image, mask_HxWx1 float32 in {0, 1}).

  ``source_HxWxC`` feeds 'appearance' (another normal image; the others ignore it). strength scales
  the opacity of (a) and (b) and the amplitude of (c); 0 changes nothing.
  """
  _check_image(image_HxWxC)
  branches = [_kind_fn(name, spec) for name in spec.kinds]
  k_draw = jax.random.split(key)[1]
  if len(branches) == 1:
    return branches[0](k_draw, image_HxWxC, source_HxWxC, strength)
  return jax.lax.switch(kind_index(key, spec), branches, k_draw, image_HxWxC, source_HxWxC,
                        jnp.asarray(strength, jnp.float32))


@functools.partial(jax.jit, static_argnames=('spec',))
def synthesize_batch(key: jax.Array, images_BxHxWxC: jax.Array, sources_BxHxWxC: jax.Array | None = None,
                     spec: AnomalySpec = AnomalySpec(), strength: float | jax.Array = 1.0
                     ) -> tuple[jax.Array, jax.Array]:
  """synthesize over the batch with keys jax.random.split(key, B); -> (images, masks_BxHxWx1 float32).

  sources default to the batch rolled by one (image i borrows image i - 1; a batch of one borrows
  itself, warped).
  """
  if images_BxHxWxC.ndim != 4:
    raise ValueError(f'images must be B x H x W x C, got {images_BxHxWxC.shape}.')
  if sources_BxHxWxC is None:
    sources_BxHxWxC = jnp.roll(images_BxHxWxC, 1, axis=0)
  if sources_BxHxWxC.shape[0] != images_BxHxWxC.shape[0]:
    raise ValueError(f'sources {sources_BxHxWxC.shape} and images {images_BxHxWxC.shape} differ in B.')
  keys = jax.random.split(key, images_BxHxWxC.shape[0])
  one = functools.partial(synthesize, spec=spec, strength=strength)
  return jax.vmap(one)(keys, images_BxHxWxC, sources_BxHxWxC)
