"""Synthetic defects in the U-Net methods' batches (``config.synth``; semiseg/anomalies.py draws them).

With ``config.synth.enabled``, round(share * batch_size) images of each U-Net batch are unlabeled images
with synthetic defects and exact masks, the rest real labeled images. The defects are drawn inside the
jitted step on the stored image, before the rigid warp, keyed by ``fold_in(step key, FOLD)``: the warp
then moves image, mask (and ae_unet's D) together, as for a labeled image, and a resumed run draws the
defects an uninterrupted one would. unet and ae_unet then also read the unlabeled stream (``count``
images per step); pi_model and mean_teacher take the first ``count`` images of their own unlabeled
batch (one unlabeled stream per run, no second copy to the device; they are normal images either way).
``share=1`` with ``config.data.k_labeled=0`` trains from unlabeled images alone (zero-label mode).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from semiseg import anomalies
from semiseg.methods import base

# fold_in(step key, FOLD) keys the defects: the step key itself warps the batch, 1 the consistency views.
FOLD = 2
GATE_IMAGES = 32  # unlabeled images that carry the synthetic defects ae_unet's gate ranks in zero-label mode
GATE_SEED = 0


@dataclasses.dataclass(frozen=True)
class SynthSpec:
  """``config.synth`` resolved against ``config.batch_size``; hashable (a static part of the step)."""
  count: int  # synthetic images per U-Net batch; 0: off
  labeled: int  # labeled images per U-Net batch (config.batch_size - count)
  anomaly: anomalies.AnomalySpec = anomalies.AnomalySpec()
  strength: float = 1.0

  @property
  def enabled(self) -> bool:
    return self.count > 0


def from_config(config) -> SynthSpec:
  """``config.synth`` checked, each bad value named by its key."""
  s, batch = config.get('synth'), int(config.batch_size)
  if s is None or not s.enabled:
    return SynthSpec(count=0, labeled=batch)
  kinds = tuple(k.strip() for k in str(s.kinds).split(',') if k.strip())
  if not kinds or any(k not in anomalies.KINDS for k in kinds) or len(set(kinds)) != len(kinds):
    raise ValueError(f'config.synth.kinds must be a comma-separated subset of {",".join(anomalies.KINDS)}, '
                     f'got {s.kinds!r}.')
  share, strength = float(s.share), float(s.strength)
  if not 0 < share <= 1:
    raise ValueError(f'config.synth.share must be in (0, 1] (the synthetic fraction of config.batch_size), '
                     f'got {s.share}.')
  if not (np.isfinite(strength) and strength > 0):
    raise ValueError(f'config.synth.strength must be positive, got {s.strength}.')
  count = int(round(share * batch))
  if count < 1:
    raise ValueError(f'config.synth.share={share} of config.batch_size={batch} rounds to no synthetic image; '
                     f'raise config.synth.share to at least {0.5 / batch:.3g}.')
  return SynthSpec(count=count, labeled=batch - count, anomaly=anomalies.AnomalySpec(kinds=kinds),
                   strength=strength)


def streams_and_sizes(spec: SynthSpec, own_unlabeled: int | None = None
                      ) -> tuple[tuple[str, ...], dict[str, int]]:
  """(streams, global batch size of each) of a U-Net method with synthetic defects: the labeled stream
  (when any labeled image is left) and the unlabeled one, of ``count`` images, or of ``own_unlabeled``
  (pi_model, mean_teacher: config.unlabeled_batch_size, of which the first ``count`` carry defects)."""
  unlabeled = spec.count if own_unlabeled is None else int(own_unlabeled)
  if unlabeled < spec.count:
    raise ValueError(f'config.unlabeled_batch_size={unlabeled} is smaller than the {spec.count} synthetic images '
                     'per batch (config.synth.share * config.batch_size) taken from the unlabeled batch; raise it.')
  sizes = ({'labeled': spec.labeled} if spec.labeled else {}) | {'unlabeled': unlabeled}
  return tuple(sizes), sizes


def defects(step_key: jax.Array, images_uint8_BxHxWx3: jax.Array, spec: SynthSpec
            ) -> tuple[jax.Array, jax.Array]:
  """The first ``spec.count`` images with synthetic defects: (images float [0, 1], masks_BxHxWx1 float)."""
  images = base.to_float(images_uint8_BxHxWx3[:spec.count])
  return anomalies.synthesize_batch(jax.random.fold_in(step_key, FOLD), images, None, spec.anomaly,
                                    spec.strength)


def gate_examples(unlabeled_uint8: np.ndarray, spec: SynthSpec) -> tuple[np.ndarray, np.ndarray]:
  """Zero-label mode's stand-in for the labeled images where a decision ranks their defect pixels
  (ae_unet's diff_gate): up to GATE_IMAGES unlabeled images, evenly spaced, with synthetic defects of the
  run's kinds and strength drawn from PRNGKey(GATE_SEED), rounded to uint8 (images, masks uint8 [N, S, S, 1])."""
  n = min(GATE_IMAGES, len(unlabeled_uint8))
  rows = np.linspace(0, len(unlabeled_uint8) - 1, n).round().astype(int)
  images, masks = anomalies.synthesize_batch(jax.random.PRNGKey(GATE_SEED),
                                             base.to_float(unlabeled_uint8[rows]), None, spec.anomaly, spec.strength)
  return (np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8),
          np.asarray(masks).astype(np.uint8))
