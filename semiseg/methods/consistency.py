"""What the consistency methods (pi_model, mean_teacher) share: two views of the unlabeled images, the
comparison of their probability maps in one frame, and the ramp-up of its weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from semiseg import augment


def rampup_weight(step: jax.Array, max_weight: float, rampup_steps: int) -> jax.Array:
  """Laine and Aila's sigmoid ramp-up: max_weight * exp(-5 (1 - t)^2), t = min(step / rampup_steps, 1)."""
  if rampup_steps <= 0:
    return jnp.asarray(max_weight, jnp.float32)
  t = jnp.clip(step.astype(jnp.float32) / rampup_steps, 0.0, 1.0)
  return max_weight * jnp.exp(-5.0 * jnp.square(1.0 - t))


def two_views(key: jax.Array, images_BxHxWx3: jax.Array, spec: augment.AugmentSpec):
  """Two independent random warps (crops for textures) of each image: (v1, v2, M1, M2)."""
  k1, k2 = jax.random.split(key)
  v1, _, m1 = augment.augment_batch(k1, images_BxHxWx3, None, spec)
  v2, _, m2 = augment.augment_batch(k2, images_BxHxWx3, None, spec)
  return v1, v2, m1, m2


def align_to_view1(p2_BxSxSx1: jax.Array, m1_Bx3x3: jax.Array, m2_Bx3x3: jax.Array,
                   in_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """View 2's map resampled in view 1's frame, and where the comparison is valid ([B, S, S, 1] each).

  v_i(o) = x(M_i o), so view-1 pixel o shows x(M1 o) = x(M2 q) at q = inv(M2) M1 o =: M21 o, and
  p2_in_1(o) = p2(M21 o) (bilinear; the crop is part of M_i, so in_hw != out_hw needs nothing else).
  Valid where (a) M21 o lies inside view 2's S x S grid, so the bilinear read touches no padding, and
  (b) M1 o lies at least 1.5 px inside x: the view-2 pixels read around M21 o are within sqrt(2) px
  of it and M2 is rigid, so they sampled x within sqrt(2) px of M1 o, i.e. inside x too. Then both
  maps at o come from real image content only (no border fill from either warp).
  """
  out_hw = tuple(p2_BxSxSx1.shape[1:3])
  m21_Bx3x3 = augment.inverse_matrices(m2_Bx3x3) @ m1_Bx3x3
  p2_in_1 = augment.warp_batch(p2_BxSxSx1, m21_Bx3x3, out_hw, 1, 'constant')
  valid = (augment.valid_region(m1_Bx3x3, in_hw, out_hw, margin=1.5)
           * augment.valid_region(m21_Bx3x3, out_hw, out_hw))
  return p2_in_1, valid


def aligned_consistency(p1_BxSxSx1: jax.Array, p2_BxSxSx1: jax.Array, m1_Bx3x3: jax.Array,
                        m2_Bx3x3: jax.Array, in_hw: tuple[int, int]) -> jax.Array:
  """Mean squared difference of two views' probability maps over the pixels valid in both."""
  p2_in_1, valid = align_to_view1(p2_BxSxSx1, m1_Bx3x3, m2_Bx3x3, in_hw)
  return (jnp.square(p1_BxSxSx1 - p2_in_1) * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def settings(config) -> tuple[float, int]:
  """(max weight, ramp-up steps) of ``config.consistency``, checked."""
  c = config.consistency
  if float(c.weight) < 0:
    raise ValueError(f'config.consistency.weight must be >= 0, got {c.weight}.')
  if int(c.rampup_steps) < 0:
    raise ValueError(f'config.consistency.rampup_steps must be >= 0, got {c.rampup_steps}.')
  return float(c.weight), int(c.rampup_steps)
