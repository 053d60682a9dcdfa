"""Tests for semiseg.augment against scipy.ndimage.affine_transform and hand-built cases."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from semiseg import augment

SCIPY_MODE = {'constant': 'grid-constant', 'reflect': 'mirror', 'edge': 'nearest'}


def _rigid(alpha: float, t_row: float, t_col: float, flip_row: bool, flip_col: bool,
           in_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
  """Independent float64 construction of M o = c_in + t + R F (o - c_out)."""
  c_in = (np.array(in_hw) - 1) / 2
  c_out = (np.array(out_hw) - 1) / 2
  rot = np.array([[math.cos(alpha), math.sin(alpha)], [-math.sin(alpha), math.cos(alpha)]])
  a = rot @ np.diag([-1.0 if flip_row else 1.0, -1.0 if flip_col else 1.0])
  m = np.eye(3)
  m[:2, :2] = a
  m[:2, 2] = c_in + np.array([t_row, t_col]) - a @ c_out
  return m


def _scipy_warp(image_HxWxC: np.ndarray, m: np.ndarray, out_hw, order: int, mode: str) -> np.ndarray:
  return np.stack([ndi.affine_transform(image_HxWxC[..., k].astype(np.float64), m,
                                        output_shape=out_hw, order=order, mode=mode, cval=0.0)
                   for k in range(image_HxWxC.shape[-1])], -1)


def _coords(m: np.ndarray, out_hw) -> tuple[np.ndarray, np.ndarray]:
  rows, cols = np.meshgrid(np.arange(out_hw[0]), np.arange(out_hw[1]), indexing='ij')
  return m[0, 0] * rows + m[0, 1] * cols + m[0, 2], m[1, 0] * rows + m[1, 1] * cols + m[1, 2]


def _interior(m: np.ndarray, in_hw, out_hw) -> np.ndarray:
  """Output pixels whose sample lies at least 1 px inside the input."""
  r, c = _coords(m, out_hw)
  return (r >= 1) & (r <= in_hw[0] - 2) & (c >= 1) & (c <= in_hw[1] - 2)


@pytest.fixture(scope='module')
def image() -> np.ndarray:
  return np.random.default_rng(0).random((40, 52, 3)).astype(np.float32)


MATRIX_CASES = [  # (alpha, t_row, t_col, flip_row, flip_col, out_hw)
    (0.31, 3.3, -5.7, True, False, (40, 52)),
    (-0.22, -7.1, 2.9, False, True, (33, 45)),
    (1.1, 0.4, 0.6, True, True, (48, 30)),
]


@pytest.mark.parametrize('case', MATRIX_CASES)
def test_bilinear_constant_matches_scipy(image, case):
  *params, out_hw = case
  m = _rigid(*params, image.shape[:2], out_hw)
  ours = np.asarray(augment.warp(jnp.asarray(image), jnp.asarray(m, jnp.float32), out_hw, 1,
                                 'constant'))
  inside = _interior(m, image.shape[:2], out_hw)
  assert inside.mean() > 0.3
  ref = _scipy_warp(image, m, out_hw, 1, 'constant')
  assert np.abs(ours - ref)[inside].max() < 1e-4
  # Over the whole image, 'constant' (zero weight per outside neighbour) is scipy's 'grid-constant'.
  ref_grid = _scipy_warp(image, m, out_hw, 1, 'grid-constant')
  assert np.abs(ours - ref_grid).max() < 1e-4


@pytest.mark.parametrize('border', ['reflect', 'edge'])
@pytest.mark.parametrize('order', [0, 1])
def test_borders_match_scipy_everywhere(image, border, order):
  # A large translation so that many samples fall far outside (several reflections).
  out_hw = (45, 50)
  m = _rigid(0.4, 30.0, -70.0, False, True, image.shape[:2], out_hw)
  ours = np.asarray(augment.warp(jnp.asarray(image), jnp.asarray(m, jnp.float32), out_hw, order,
                                 border))
  ref = _scipy_warp(image, m, out_hw, order, SCIPY_MODE[border])
  diff = np.abs(ours - ref)
  if order == 0:  # float32 vs float64 coordinates may round differently within a hair of .5
    r, c = _coords(m, out_hw)
    near_tie = (np.abs(r % 1 - 0.5) < 1e-3) | (np.abs(c % 1 - 0.5) < 1e-3)
    diff = diff[~near_tie]
  assert diff.max() < 1e-4


@pytest.mark.parametrize('case', MATRIX_CASES)
def test_nearest_matches_scipy_order0(case):
  *params, out_hw = case
  mask = (np.random.default_rng(1).random((40, 52, 1)) > 0.7).astype(np.float32)
  m = _rigid(*params, mask.shape[:2], out_hw)
  ours = np.asarray(augment.warp(jnp.asarray(mask), jnp.asarray(m, jnp.float32), out_hw, 0,
                                 'constant'))
  ref = _scipy_warp(mask, m, out_hw, 0, 'constant')
  r, c = _coords(m, out_hw)
  near_tie = (np.abs(r % 1 - 0.5) < 1e-3) | (np.abs(c % 1 - 0.5) < 1e-3)
  keep = _interior(m, mask.shape[:2], out_hw) & ~near_tie
  np.testing.assert_array_equal(ours[keep], ref[keep])
  assert set(np.unique(ours)) <= {0.0, 1.0}


def test_warp_then_inverse_restores_valid_region():
  # A smooth image: bilinear resampling twice changes it by far less than the tolerance.
  rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing='ij')
  smooth = np.stack([0.5 + 0.4 * np.sin(rows / 9.0) * np.cos(cols / 7.0),
                     0.5 + 0.4 * np.cos((rows + cols) / 11.0)], -1).astype(np.float32)
  spec = augment.AugmentSpec(max_rotation_deg=30.0, max_translate=0.15)
  m_Bx3x3 = augment.sample_matrices(jax.random.key(3), 4, spec, (64, 64), (64, 64))
  x = jnp.broadcast_to(jnp.asarray(smooth), (4, 64, 64, 2))
  warped = augment.warp_batch(x, m_Bx3x3, (64, 64), 1, 'constant')
  back = augment.warp_batch(warped, augment.inverse_matrices(m_Bx3x3), (64, 64), 1, 'constant')
  # Valid: o maps inside the warped view, and o is >= 2 px inside x, so every warped neighbour read
  # there (within sqrt(2) px of o once mapped back) sampled inside x.
  valid = np.array(augment.valid_region(augment.inverse_matrices(m_Bx3x3), (64, 64), (64, 64)))
  valid[:, :2] = valid[:, -2:] = valid[:, :, :2] = valid[:, :, -2:] = 0
  assert valid.mean() > 0.4
  err = np.abs(np.asarray(back) - np.asarray(x)) * valid
  assert err.max() < 0.01


def test_inverse_is_exact_for_integer_translation_and_flip():
  m = _rigid(0.0, 5.0, -3.0, True, False, (20, 24), (20, 24))
  m_1x3x3 = jnp.asarray(m[None], jnp.float32)
  x = jnp.asarray(np.random.default_rng(2).random((1, 20, 24, 3)), jnp.float32)
  warped = augment.warp_batch(x, m_1x3x3, (20, 24), 1, 'constant')
  back = augment.warp_batch(warped, augment.inverse_matrices(m_1x3x3), (20, 24), 0, 'constant')
  valid = np.asarray(augment.valid_region(augment.inverse_matrices(m_1x3x3), (20, 24), (20, 24)))
  np.testing.assert_array_equal(np.asarray(back) * valid, np.asarray(x) * valid)
  np.testing.assert_allclose(np.asarray(augment.inverse_matrices(m_1x3x3))[0], np.linalg.inv(m),
                             atol=1e-5)


def test_two_view_composition():
  """p2 seen in view 1's frame equals view 1 (the Pi-model / Mean Teacher comparison)."""
  rows, cols = np.meshgrid(np.arange(48), np.arange(48), indexing='ij')
  x = jnp.asarray((0.5 + 0.4 * np.sin(rows / 6.0 + cols / 8.0))[None, ..., None], jnp.float32)
  spec = augment.AugmentSpec(max_rotation_deg=20.0)
  m1 = augment.sample_matrices(jax.random.key(10), 1, spec, (48, 48), (48, 48))
  m2 = augment.sample_matrices(jax.random.key(11), 1, spec, (48, 48), (48, 48))
  v1 = augment.warp_batch(x, m1, (48, 48), 1, 'constant')
  v2 = augment.warp_batch(x, m2, (48, 48), 1, 'constant')
  m21 = augment.inverse_matrices(m2) @ m1
  v2_in_1 = augment.warp_batch(v2, m21, (48, 48), 1, 'constant')
  # margin: without it the last pixel ring may read view-2 pixels that faded into the border.
  both = np.asarray(augment.valid_region(m1, (48, 48), (48, 48), margin=1.5)
                    * augment.valid_region(m21, (48, 48), (48, 48)))
  assert both.mean() > 0.4
  assert (np.abs(np.asarray(v2_in_1 - v1)) * both).max() < 0.01


def test_sample_matrices_deterministic_and_within_limits():
  spec = augment.AugmentSpec(max_rotation_deg=15.0, max_translate=0.1)
  a = augment.sample_matrices(jax.random.key(0), 64, spec, (100, 80), (100, 80))
  b = augment.sample_matrices(jax.random.key(0), 64, spec, (100, 80), (100, 80))
  c = augment.sample_matrices(jax.random.key(1), 64, spec, (100, 80), (100, 80))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert a.shape == (64, 3, 3) and a.dtype == jnp.float32
  m = np.asarray(a, np.float64)
  np.testing.assert_allclose(m[:, 2], np.broadcast_to([0, 0, 1], (64, 3)))
  # Rigid: |det| = 1, orthonormal columns; the angle is the same whichever flips were drawn.
  np.testing.assert_allclose(np.abs(np.linalg.det(m[:, :2, :2])), 1.0, atol=1e-5)
  cos = np.abs(m[:, 0, 0])
  assert np.all(cos >= math.cos(math.radians(15.0)) - 1e-6)
  flips = np.sign(np.linalg.det(m[:, :2, :2]))
  assert (flips < 0).any() and (flips > 0).any()
  # The output centre maps to the input centre plus a translation within +-10% of each side.
  centre = m[:, :2, :2] @ np.array([49.5, 39.5]) + m[:, :2, 2]
  shift = centre - np.array([49.5, 39.5])
  assert np.all(np.abs(shift) <= np.array([10.0, 8.0]) + 1e-4)
  assert np.abs(shift).max() > 2.0


def test_flips_off_when_disabled():
  spec = augment.AugmentSpec(flip_x=False, flip_y=False)
  m = np.asarray(augment.sample_matrices(jax.random.key(0), 64, spec, (32, 32), (32, 32)))
  assert np.all(np.linalg.det(m[:, :2, :2]) > 0)
  assert np.all(m[:, 0, 0] > 0.9) and np.all(m[:, 1, 1] > 0.9)
  only_x = augment.AugmentSpec(max_rotation_deg=0.0, max_translate=0.0, flip_y=False)
  m = np.asarray(augment.sample_matrices(jax.random.key(0), 64, only_x, (32, 32), (32, 32)))
  np.testing.assert_array_equal(m[:, 0, 0], 1.0)  # rows never mirrored
  assert set(np.unique(m[:, 1, 1])) == {-1.0, 1.0}


def test_identity_when_not_enabled():
  spec = augment.AugmentSpec(enabled=False)
  m = np.asarray(augment.sample_matrices(jax.random.key(0), 8, spec, (32, 40), (32, 40)))
  np.testing.assert_array_equal(m, np.broadcast_to(np.eye(3), (8, 3, 3)))
  x = jnp.asarray(np.random.default_rng(0).random((8, 32, 40, 3)), jnp.float32)
  out, masks, _ = augment.augment_batch(jax.random.key(0), x, None, spec)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
  assert masks is None


def test_texture_crops_stay_inside():
  spec = augment.AugmentSpec(max_rotation_deg=0.0, max_translate=0.0, crop_size=16)
  m = augment.sample_matrices(jax.random.key(0), 256, spec, (32, 32), (16, 16))
  valid = np.asarray(augment.valid_region(m, (32, 32), (16, 16)))
  assert valid.shape == (256, 16, 16, 1) and valid.min() == 1.0
  corners = np.asarray(m)[:, :2, :2] @ np.array([0.0, 0.0]) + np.asarray(m)[:, :2, 2]
  assert len({tuple(c) for c in corners}) > 20  # the window moves
  # Not enabled: still a random crop, pixels copied exactly from one window of the input.
  x = jnp.asarray(np.random.default_rng(0).random((4, 32, 32, 2)), jnp.float32)
  off = augment.AugmentSpec(enabled=False, crop_size=16)
  out, _, mats = augment.augment_batch(jax.random.key(5), x, None, off)
  assert out.shape == (4, 16, 16, 2)
  for b in range(4):
    r0, c0 = np.asarray(mats[b, :2, 2]).astype(int)
    np.testing.assert_array_equal(np.asarray(out[b]), np.asarray(x[b, r0:r0 + 16, c0:c0 + 16]))
  with pytest.raises(ValueError, match='larger than the input'):
    augment.sample_matrices(jax.random.key(0), 1, spec, (8, 8), (16, 16))


def test_tiles_round_trip():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  tiles = augment.to_tiles(x, 4)
  assert tiles.shape == (2 * 2 * 3, 4, 4, 3)
  np.testing.assert_array_equal(np.asarray(tiles[4]), np.asarray(x[0, 4:8, 4:8]))
  np.testing.assert_array_equal(np.asarray(augment.from_tiles(tiles, 2, 8, 12)), np.asarray(x))
  with pytest.raises(ValueError, match='not divisible'):
    augment.to_tiles(x, 5)


def test_augment_batch_jit_vmap_and_same_geometry():
  """Channel 0 of the image is the mask: warped with order 0, both must agree pixel for pixel."""
  rng = np.random.default_rng(0)
  mask = (ndi.uniform_filter(rng.random((4, 48, 48)), 5) > 0.5).astype(np.float32)[..., None]
  noise = rng.random((4, 48, 48, 2)).astype(np.float32)
  images = jnp.asarray(np.concatenate([mask, noise], -1))
  spec = augment.AugmentSpec(max_rotation_deg=25.0, max_translate=0.2)
  step = jax.jit(augment.augment_batch, static_argnames='spec')
  out, out_masks, mats = step(jax.random.key(7), images, jnp.asarray(mask), spec)
  eager, eager_masks, eager_mats = augment.augment_batch(jax.random.key(7), images,
                                                         jnp.asarray(mask), spec)
  np.testing.assert_allclose(np.asarray(out), np.asarray(eager), atol=1e-4)  # FMA rounding
  np.testing.assert_array_equal(np.asarray(out_masks), np.asarray(eager_masks))
  np.testing.assert_allclose(np.asarray(mats), np.asarray(eager_mats), atol=1e-6)
  assert out.shape == (4, 48, 48, 3) and out_masks.shape == (4, 48, 48, 1)
  # Same geometry: the mask channel of the image, warped nearest, equals the warped mask.
  as_mask = augment.warp_batch(images[..., :1], mats, (48, 48), 0, 'constant')
  np.testing.assert_array_equal(np.asarray(as_mask), np.asarray(out_masks))
  # And against an independent scipy order-0 warp of each mask.
  for b in range(4):
    m = np.asarray(mats[b], np.float64)
    ref = ndi.affine_transform(mask[b, ..., 0], m, order=0, mode='grid-constant', cval=0.0)
    r, c = _coords(m, (48, 48))
    near_tie = (np.abs(r % 1 - 0.5) < 1e-3) | (np.abs(c % 1 - 0.5) < 1e-3)
    np.testing.assert_array_equal(np.asarray(out_masks[b, ..., 0])[~near_tie], ref[~near_tie])
  # Bilinear image channel 0 thresholded agrees with the nearest mask away from mask edges.
  agree = (np.asarray(out[..., 0]) > 0.5) == (np.asarray(out_masks[..., 0]) > 0.5)
  assert agree.mean() > 0.97
  # A batch of keys under vmap (e.g. per-device draws) also works.
  keys = jax.random.split(jax.random.key(1), 2)
  vout, vmasks, vmats = jax.vmap(lambda k, x, y: augment.augment_batch(k, x, y, spec))(
      keys, jnp.stack([images, images]), jnp.stack([jnp.asarray(mask)] * 2))
  assert vout.shape == (2, 4, 48, 48, 3) and vmasks.shape == (2, 4, 48, 48, 1)
  assert vmats.shape == (2, 4, 3, 3)


def test_reflect_border_fills_corners():
  spec = augment.AugmentSpec(max_rotation_deg=30.0, max_translate=0.2, border='reflect')
  x = jnp.full((2, 32, 32, 1), 0.7, jnp.float32)
  out, masks, _ = augment.augment_batch(jax.random.key(0), x, jnp.ones((2, 32, 32, 1)), spec)
  np.testing.assert_allclose(np.asarray(out), 0.7, atol=1e-6)  # no zeros leak in
  assert np.asarray(masks).min() == 0.0  # but the mask is 0 outside the input


def test_spec_validation():
  hash(augment.AugmentSpec(True, 10.0, 0.05, False, True, 'reflect', 256))  # static argument of jit
  with pytest.raises(ValueError, match='border'):
    augment.AugmentSpec(border='wrap')
  with pytest.raises(ValueError, match='order'):
    augment.warp(jnp.zeros((4, 4, 1)), jnp.eye(3), (4, 4), 3, 'constant')


def test_gradient_flows_through_warp():
  """Consistency losses warp predictions: the warp must be differentiable w.r.t. the image."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.random((1, 12, 12, 2)), jnp.float32)
  w = jnp.asarray(rng.random((1, 12, 12, 2)), jnp.float32)
  m = jnp.asarray(_rigid(0.3, 1.2, -0.7, True, False, (12, 12), (12, 12))[None], jnp.float32)
  loss = lambda x: jnp.sum(w * augment.warp_batch(x, m, (12, 12), 1, 'reflect'))
  grad = np.asarray(jax.grad(loss)(x))
  e = np.zeros((1, 12, 12, 2), np.float32)
  e[0, 6, 4, 1] = 1.0
  # The loss is linear in x, so a unit step gives the exact partial derivative.
  assert abs(float(loss(x + e) - loss(x)) - grad[0, 6, 4, 1]) < 1e-4
  assert np.abs(grad).sum() > 0
