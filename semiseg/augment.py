"""Random rigid affine + flip augmentation on device: bilinear warps for images, nearest for masks.

Coordinates are (row, col) pixel indices, pixel centres at integers, (0, 0) the top-left pixel. A
3x3 homogeneous matrix M maps an OUTPUT pixel (row, col, 1) to an INPUT position, and

  warp(image, M)(o) = image(M @ o)

exactly as ``scipy.ndimage.affine_transform(image, M)`` for a 2-D image. The paper's eq. 6-7 are
written in (x, y) = (col, row); its A_theta maps transformed (output) to input coordinates too, so a
paper angle alpha is R = [[cos a, sin a], [-sin a, cos a]] here (rows and cols swapped).

A sampled matrix is M o = w + t + R F (o - c_out): rotate R about the output centre c_out, flip F
(flip_x mirrors columns, i.e. left-right; flip_y mirrors rows, up-down), translate t, and place the
result at w, the centre of the crop window in the input (the image centre when there is no crop;
window corners are integers so a crop with no rotation/translation copies pixels exactly).

Borders (what a sample outside the input reads), each equal over the whole image to scipy's
``affine_transform(..., order=1 or 0, mode=...)``:
  'constant' -> mode='grid-constant', cval=0 (each neighbour outside the input weighs 0, so the
                image fades to 0 over the last pixel; identical to mode='constant' inside it),
  'reflect'  -> mode='mirror' (d c b | a b c d | c b a; what numpy/jnp.pad call 'reflect'),
  'edge'     -> mode='nearest' (a a a | a b c d | d d d).
Nearest (order 0) rounds half up: index = floor(coord + 0.5).

Matrices compose like the maps they are. Consistency losses compare two views of one image in
view 1's frame (out_hw is both views' size, in_hw the image's):

  v1, v2 = warp_batch(x, M1, out_hw, 1, b), warp_batch(x, M2, out_hw, 1, b)
  M21 = inverse_matrices(M2) @ M1                  # view-1 pixel -> image -> view-2 pixel
  p2_in_1 = warp_batch(p2, M21, out_hw, 1, 'constant')
  both = valid_region(M1, in_hw, out_hw, margin=1.5) * valid_region(M21, out_hw, out_hw)
  # margin=1.5: the bilinear read of p2 near M21 o touches view-2 pixels that also sampled inside x.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

BORDERS = ('constant', 'reflect', 'edge')
# Slack for "inside" in valid_region: composed float32 matrices land a hair off integer edges.
_VALID_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """What augment_batch draws; hashable, so it can be a static argument of jit."""
  enabled: bool = True
  max_rotation_deg: float = 15.0
  max_translate: float = 0.1  # fraction of the input side
  flip_x: bool = True  # left-right
  flip_y: bool = True  # up-down
  border: str = 'constant'  # 'constant' (zeros) | 'reflect' | 'edge'
  # Textures: the input is 2x, the output a random crop_size x crop_size window (paper 3.3).
  crop_size: int | None = None

  def __post_init__(self):
    if self.border not in BORDERS:
      raise ValueError(f'AugmentSpec.border must be one of {BORDERS}, got {self.border!r}.')
    if self.max_rotation_deg < 0 or self.max_translate < 0:
      raise ValueError('AugmentSpec.max_rotation_deg and max_translate must be >= 0, got '
                       f'{self.max_rotation_deg} and {self.max_translate}.')
    if self.crop_size is not None and self.crop_size <= 0:
      raise ValueError(f'AugmentSpec.crop_size must be positive or None, got {self.crop_size}.')


@functools.partial(jax.jit, static_argnames=('batch_size', 'spec', 'in_hw', 'out_hw'))
def sample_matrices(key: jax.Array, batch_size: int, spec: AugmentSpec, in_hw: tuple[int, int],
                    out_hw: tuple[int, int]) -> jax.Array:
  """[B, 3, 3] float32 output->input matrices, one draw per example.

  Angles are uniform in +-max_rotation_deg, translations uniform in +-max_translate * input side,
  each enabled flip has probability 1/2, and the crop window (when out_hw < in_hw) has a uniform
  integer corner with the window inside the input. spec.enabled=False leaves only the crop (still
  random: textures need it even without augmentation); identity when in_hw == out_hw.
  """
  (h_in, w_in), (h_out, w_out) = in_hw, out_hw
  if h_out > h_in or w_out > w_in:
    raise ValueError(f'Output {out_hw} is larger than the input {in_hw}; crops must fit inside.')
  k_rot, k_tr, k_fx, k_fy, k_crop = jax.random.split(key, 5)
  b = batch_size
  zeros = jnp.zeros((b,), jnp.float32)
  if spec.enabled and spec.max_rotation_deg > 0:
    max_rad = math.radians(spec.max_rotation_deg)
    alpha = jax.random.uniform(k_rot, (b,), jnp.float32, -max_rad, max_rad)
  else:
    alpha = zeros
  if spec.enabled and spec.max_translate > 0:
    t = jax.random.uniform(k_tr, (b, 2), jnp.float32, -spec.max_translate, spec.max_translate)
    t = t * jnp.array([h_in, w_in], jnp.float32)
  else:
    t = jnp.zeros((b, 2), jnp.float32)

  def flip_sign(k, on):
    if not (spec.enabled and on):
      return jnp.ones((b,), jnp.float32)
    return jnp.where(jax.random.bernoulli(k, 0.5, (b,)), -1.0, 1.0).astype(jnp.float32)

  f_row, f_col = flip_sign(k_fy, spec.flip_y), flip_sign(k_fx, spec.flip_x)
  k_r, k_c = jax.random.split(k_crop)
  corner = jnp.stack([jax.random.randint(k_r, (b,), 0, h_in - h_out + 1),
                      jax.random.randint(k_c, (b,), 0, w_in - w_out + 1)], -1).astype(jnp.float32)
  c_out = jnp.array([(h_out - 1) / 2, (w_out - 1) / 2], jnp.float32)

  cos, sin = jnp.cos(alpha), jnp.sin(alpha)
  # A = R @ diag(f_row, f_col); R is the paper's eq. 7 rotation written in (row, col).
  a_2x2 = jnp.stack([jnp.stack([cos * f_row, sin * f_col], -1),
                     jnp.stack([-sin * f_row, cos * f_col], -1)], -2)
  shift = corner + c_out + t - jnp.einsum('bij,j->bi', a_2x2, c_out)
  top = jnp.concatenate([a_2x2, shift[:, :, None]], -1)
  bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0], jnp.float32), (b, 1, 3))
  return jnp.concatenate([top, bottom], 1)


@jax.jit
def inverse_matrices(matrices_Bx3x3: jax.Array) -> jax.Array:
  """Inverse affine maps, in closed form so the last row stays exactly (0, 0, 1)."""
  m = matrices_Bx3x3
  a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
  det = a * d - b * c
  inv_2x2 = jnp.stack([jnp.stack([d, -b], -1), jnp.stack([-c, a], -1)], -2) / det[..., None, None]
  shift = -jnp.einsum('...ij,...j->...i', inv_2x2, m[..., :2, 2])
  bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0], m.dtype), m.shape[:-2] + (1, 3))
  return jnp.concatenate([jnp.concatenate([inv_2x2, shift[..., None]], -1), bottom], -2)


def _sample_coords(matrix_3x3: jax.Array, out_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """Input (row, col) positions of every output pixel, each [H_out * W_out]."""
  h, w = out_hw
  rows = jnp.arange(h, dtype=jnp.float32)[:, None]
  cols = jnp.arange(w, dtype=jnp.float32)[None, :]
  m = matrix_3x3.astype(jnp.float32)
  r = m[0, 0] * rows + m[0, 1] * cols + m[0, 2]
  c = m[1, 0] * rows + m[1, 1] * cols + m[1, 2]
  return r.reshape(-1), c.reshape(-1)


def _map_index(i: jax.Array, n: int, border: str) -> jax.Array:
  """Integer indices outside [0, n) -> the index whose value the border rule ('edge' or 'reflect')
  reads there; warp reads 'constant' like 'edge' and zeroes what lies outside."""
  if border == 'edge':
    return jnp.clip(i, 0, n - 1)
  if n == 1:
    return jnp.zeros_like(i)
  period = 2 * (n - 1)  # scipy 'mirror': the edge pixel itself is not repeated
  i = jnp.mod(i, period)
  return jnp.where(i >= n, period - i, i)


@functools.partial(jax.jit, static_argnames=('out_hw', 'order', 'border'))
def warp(image_HxWxC: jax.Array, matrix_3x3: jax.Array, out_hw: tuple[int, int], order: int,
         border: str) -> jax.Array:
  """Resamples one image at M @ (row, col, 1): order 1 bilinear, 0 nearest; -> [H_out, W_out, C].

  Bilinear needs a float image; nearest copies values, so integer masks work too.
  """
  if order not in (0, 1):
    raise ValueError(f'warp supports order 0 (nearest) or 1 (bilinear), got {order}.')
  if border not in BORDERS:
    raise ValueError(f'border must be one of {BORDERS}, got {border!r}.')
  if order == 1 and not jnp.issubdtype(image_HxWxC.dtype, jnp.floating):
    raise TypeError(f'Bilinear warp needs a float image (scale uint8 to [0, 1] first), got '
                    f'{image_HxWxC.dtype}.')
  h, w, ch = image_HxWxC.shape
  # The barrier keeps XLA from fusing whatever computed the matrix (sin, cos of sampled angles) into
  # the per-pixel loop, where it would be recomputed for every output value (~1.6x slower).
  matrix_3x3 = jax.lax.optimization_barrier(matrix_3x3)
  r, c = _sample_coords(matrix_3x3, out_hw)
  # One gather of a [C] row per neighbour from the flattened image, all pixels at once.
  flat_PxC = image_HxWxC.reshape(-1, ch)
  read_border = 'edge' if border == 'constant' else border  # 'constant': an in-range read, then x 0

  def gather(ri, ci):
    idx = _map_index(ri, h, read_border) * w + _map_index(ci, w, read_border)
    return flat_PxC.at[idx].get(mode='promise_in_bounds')  # in range by construction: no clamp

  def inside(i, n):  # 0 <= i < n, by one unsigned compare
    return i.astype(jnp.uint32) < n

  if order == 0:
    ri, ci = jnp.floor(r + 0.5).astype(jnp.int32), jnp.floor(c + 0.5).astype(jnp.int32)
    out = gather(ri, ci)
    if border == 'constant':
      out = jnp.where((inside(ri, h) & inside(ci, w))[:, None], out, jnp.zeros((), out.dtype))
  else:
    r0f, c0f = jnp.floor(r), jnp.floor(c)
    fr, fc = r - r0f, c - c0f
    r0, c0 = r0f.astype(jnp.int32), c0f.astype(jnp.int32)
    # 'constant': neighbours outside the image are read like 'edge' and multiplied by 0, cheaper than
    # reading a zero-padded copy of the image. Interpolating by differences (not a weighted sum of
    # four) keeps a constant image exactly constant.
    p00, p01 = gather(r0, c0), gather(r0, c0 + 1)
    p10, p11 = gather(r0 + 1, c0), gather(r0 + 1, c0 + 1)
    if border == 'constant':
      vr0, vr1, vc0, vc1 = inside(r0, h), inside(r0 + 1, h), inside(c0, w), inside(c0 + 1, w)
      p00, p01 = p00 * (vr0 & vc0)[:, None], p01 * (vr0 & vc1)[:, None]
      p10, p11 = p10 * (vr1 & vc0)[:, None], p11 * (vr1 & vc1)[:, None]
    fr, fc = fr[:, None], fc[:, None]
    top = p00 + fc * (p01 - p00)
    bottom = p10 + fc * (p11 - p10)
    out = top + fr * (bottom - top)
  return out.reshape(*out_hw, ch).astype(image_HxWxC.dtype)


@functools.partial(jax.jit, static_argnames=('out_hw', 'order', 'border'))
def warp_batch(images_BxHxWxC: jax.Array, matrices_Bx3x3: jax.Array, out_hw: tuple[int, int],
               order: int, border: str) -> jax.Array:
  """warp over the batch (jax.vmap), one matrix per image."""
  fn = functools.partial(warp, out_hw=out_hw, order=order, border=border)
  return jax.vmap(fn)(images_BxHxWxC, matrices_Bx3x3)


def augment_batch(key: jax.Array, images_BxHxWxC: jax.Array, masks_BxHxWx1: jax.Array | None,
                  spec: AugmentSpec) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """Draws one warp per example; images bilinear with spec.border, masks nearest with zeros outside.

  Returns (images [B, S, S, C], masks [B, S, S, 1] or None, matrices [B, 3, 3]) with S = crop_size,
  or the input size when crop_size is None. Jit with spec static.
  """
  b, h, w, _ = images_BxHxWxC.shape
  if masks_BxHxWx1 is not None and masks_BxHxWx1.shape[:3] != (b, h, w):
    raise ValueError(f'Masks {masks_BxHxWx1.shape} do not match images {images_BxHxWxC.shape}.')
  out_hw = (h, w) if spec.crop_size is None else (spec.crop_size, spec.crop_size)
  matrices_Bx3x3 = sample_matrices(key, b, spec, (h, w), out_hw)
  images = warp_batch(images_BxHxWxC, matrices_Bx3x3, out_hw, 1, spec.border)
  masks = None
  if masks_BxHxWx1 is not None:
    # Outside the input is non-defect (0), whatever the image border does.
    masks = warp_batch(masks_BxHxWx1, matrices_Bx3x3, out_hw, 0, 'constant')
  return images, masks, matrices_Bx3x3


@functools.partial(jax.jit, static_argnames=('in_hw', 'out_hw', 'margin'))
def valid_region(matrices_Bx3x3: jax.Array, in_hw: tuple[int, int], out_hw: tuple[int, int],
                 margin: float = 0.0) -> jax.Array:
  """[B, H_out, W_out, 1] float32: 1 where M o lies in [0, H_in-1] x [0, W_in-1], shrunk by margin.

  margin=0: the sample reads no border pixel. A bilinear read of a warped view at M o also touches
  view pixels up to sqrt(2) px away, so margin=1.5 on the other factor keeps those off the border.
  """
  h_in, w_in = in_hw
  lo = margin - _VALID_EPS

  def one(m):
    r, c = _sample_coords(m, out_hw)
    inside = ((r >= lo) & (r <= h_in - 1 - lo) & (c >= lo) & (c <= w_in - 1 - lo))
    return inside.astype(jnp.float32).reshape(*out_hw, 1)

  return jax.vmap(one)(matrices_Bx3x3)


def to_tiles(images_BxHxWxC: jax.Array, tile: int) -> jax.Array:
  """[B, H, W, C] -> [B * (H/tile) * (W/tile), tile, tile, C], tiles row-major within each image."""
  b, h, w, ch = images_BxHxWxC.shape
  if h % tile or w % tile:
    raise ValueError(f'to_tiles: image size {h}x{w} is not divisible by the tile size {tile}.')
  x = images_BxHxWxC.reshape(b, h // tile, tile, w // tile, tile, ch)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, tile, tile, ch)


def from_tiles(tiles: jax.Array, batch: int, h: int, w: int) -> jax.Array:
  """Inverse of to_tiles: [B * n_h * n_w, tile, tile, C] -> [B, h, w, C]."""
  n, tile, tile_w, ch = tiles.shape
  if tile != tile_w or h % tile or w % tile or n != batch * (h // tile) * (w // tile):
    raise ValueError(f'from_tiles: {tiles.shape} tiles do not make {batch} images of {h}x{w}.')
  x = tiles.reshape(batch, h // tile, w // tile, tile, tile, ch)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, h, w, ch)
