"""``ae_unet``: the paper's method. U-Net on concat[I, |I - AE(I)|] with the AE frozen (eq. 3-5)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_dict

from semiseg import augment, metrics
from semiseg.methods import autoencoder, base, synthetic, unet
from semiseg.models.autoencoder import ConvAutoencoder
from semiseg.models.unet import UNet

log = logging.getLogger(__name__)

INPUTS = ('image', 'diff', 'image+diff')  # the paper's Table 4 ablation
# How D enters the U-Net: as is ('none') or divided by the 99th percentile of D over the category's
# unlabeled images ('p99', fixed when the method is created), so a defect's D is ~1 next to the image's
# [0, 1] whatever the category's reconstruction error.
DIFF_SCALE = ('none', 'p99')
# Whether D enters at all: always ('none', the paper), or only when D ranks the labeled images' defect
# pixels better than the trivial |I - M| does ('trivial'; M the mean unlabeled image). The labeled images
# are training data, so the decision uses no test label; a closed gate feeds D as zeros. 'best': the same
# decision, but where |I - M| wins it enters in D's place (blurred and scaled as D is), not zeros. It
# applies to unet_input='image+diff' only. Without labeled images (config.data.k_labeled=0, zero-label
# mode) the pixels ranked are synthetic defects on unlabeled images (synthetic.gate_examples).
DIFF_GATE = ('none', 'trivial', 'best')


def validate(config) -> None:
  unet.validate(config)
  autoencoder.validate(config)
  if config.model.unet_input not in INPUTS:
    raise ValueError(f'config.model.unet_input must be one of {INPUTS}, got {config.model.unet_input!r}.')
  if config.model.diff_scale not in DIFF_SCALE:
    raise ValueError(f'config.model.diff_scale must be one of {DIFF_SCALE}, got {config.model.diff_scale!r}.')
  if config.model.get('diff_gate', 'none') not in DIFF_GATE:
    raise ValueError(f'config.model.diff_gate must be one of {DIFF_GATE}, got {config.model.diff_gate!r}.')


def mean_difference(images_BxHxWx3: jax.Array, mean_SxSx3: jax.Array, sigma: float) -> jax.Array:
  """|I - M| per channel, blurred by ``sigma`` as D is; M the mean unlabeled image at the stored size.
  Network-size tiles of a texture's stored image (evaluation, prediction, export: augment.to_tiles,
  row-major, every image's tiles in turn) each meet the tile of M at their place."""
  mean = jnp.asarray(mean_SxSx3, images_BxHxWx3.dtype)
  side = images_BxHxWx3.shape[1]
  if side == mean.shape[0]:
    diff = jnp.abs(images_BxHxWx3 - mean[None])
  else:
    tiles = augment.to_tiles(mean[None], side)  # [k, t, t, 3]
    x = images_BxHxWx3.reshape((-1,) + tiles.shape)
    diff = jnp.abs(x - tiles[None]).reshape(images_BxHxWx3.shape)
  return autoencoder.blur(diff, sigma)


def unet_input(images_BxHxWx3: jax.Array, ae_params, ae_model: ConvAutoencoder, mode: str,
               sigma: float = 0.0, scale: float = 1.0, gate: float = 1.0, mean=None) -> jax.Array:
  """The U-Net's input for an ablation mode; D (divided by ``scale``, times ``gate``) comes from the
  frozen AE (no gradient reaches it), or, ``mean`` given (diff_gate='best' chose it), |I - M| / scale."""
  if mode == 'image':
    return images_BxHxWx3
  if mean is not None:
    diff = mean_difference(images_BxHxWx3, mean, sigma) / scale
  else:
    diff = jax.lax.stop_gradient(autoencoder.difference(ae_params, images_BxHxWx3, ae_model, sigma)) * (gate / scale)
  if mode == 'diff':
    return diff
  return jnp.concatenate([images_BxHxWx3, diff], axis=-1)


def stored_difference(images_BxHxWx3: jax.Array, ae_params, ae_model: ConvAutoencoder, sigma: float,
                      tile: int | None) -> jax.Array:
  """D of stored images as evaluation computes it: textures (stored at 2x) tile by tile, stitched."""
  if tile is None:
    return autoencoder.difference(ae_params, images_BxHxWx3, ae_model, sigma)
  b, h, w, _ = images_BxHxWx3.shape
  tiles = autoencoder.difference(ae_params, augment.to_tiles(images_BxHxWx3, tile), ae_model, sigma)
  return augment.from_tiles(tiles, b, h, w)


def stored_aux(images_BxSxSx3: jax.Array, ae_params, *, ae_model: ConvAutoencoder, sigma: float, tile: int | None,
               scale: float = 1.0, gate: float = 1.0, mean=None) -> jax.Array:
  """The auxiliary channels of stored images as the U-Net receives them: D / scale * gate, or (``mean``
  given: diff_gate='best' chose |I - M|) |I - M| / scale, textures tile by tile as evaluated."""
  if mean is None:
    return jax.lax.stop_gradient(stored_difference(images_BxSxSx3, ae_params, ae_model, sigma, tile)) * (gate / scale)
  if tile is None:
    return mean_difference(images_BxSxSx3, mean, sigma) / scale
  b, h, w, _ = images_BxSxSx3.shape
  tiles = mean_difference(augment.to_tiles(images_BxSxSx3, tile), mean, sigma)
  return augment.from_tiles(tiles, b, h, w) / scale


def train_step(state: base.TrainState, batch: base.Batch, *, model: UNet, ae_model: ConvAutoencoder,
               tx: optax.GradientTransformation, spec: augment.AugmentSpec, mode: str, sigma: float,
               tile: int | None = None, scale: float = 1.0, gate: float = 1.0,
               synth: synthetic.SynthSpec | None = None, mean=None):
  if mode == 'image':
    images, masks = unet.augmented_labeled(state, batch, spec, synth)
    inputs = images
  else:
    # D of the image the AE was trained on (unwarped), then one warp for image, D and mask: the U-Net
    # learns from the D it will see at test time, not from the AE's errors on rotated, shifted views.
    aux = partial(stored_aux, ae_model=ae_model, sigma=sigma, tile=tile, scale=scale, gate=gate, mean=mean)
    parts = []
    if synth is None or synth.labeled:
      images = base.to_float(batch['labeled']['image'])
      if 'diff' in batch['labeled']:  # computed once by the loop (stream_fields below), already scaled
        diff = batch['labeled']['diff'].astype(jnp.float32)
      else:
        diff = aux(images, state.extras['ae_params'])
      parts.append((images, diff, batch['labeled']['mask'].astype(jnp.float32)))
    if synth is not None and synth.enabled:
      # Synthetic defects on stored unlabeled images; their D (or |I - M|) from the frozen AE here, in the
      # step, processed as a labeled image's.
      s_images, s_masks = synthetic.defects(base.step_key(state), batch['unlabeled']['image'], synth)
      parts.append((s_images, aux(s_images, state.extras['ae_params']), s_masks))
    images, diff, masks = parts[0] if len(parts) == 1 else (jnp.concatenate(x) for x in zip(*parts))
    warped, masks, _ = augment.augment_batch(base.step_key(state), jnp.concatenate([images, diff], -1),
                                             masks, spec)
    inputs = warped if mode == 'image+diff' else warped[..., 3:]

  def loss_fn(params):
    return base.sigmoid_bce(model.apply(params, inputs), masks)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return base.apply_updates(state, grads, tx), {'loss': loss}


def score_map(state: base.TrainState, images_BxHxWx3: jax.Array, *, model: UNet, ae_model: ConvAutoencoder,
              mode: str, sigma: float, scale: float = 1.0, gate: float = 1.0, mean=None) -> jax.Array:
  inputs = unet_input(images_BxHxWx3, state.extras['ae_params'], ae_model, mode, sigma, scale, gate, mean)
  return jax.nn.sigmoid(model.apply(state.params, inputs)[..., 0])


def reconstruct(state: base.TrainState, images_BxHxWx3: jax.Array, *, ae_model: ConvAutoencoder) -> jax.Array:
  return ae_model.apply(state.extras['ae_params'], images_BxHxWx3)


def init(key: jax.Array, *, model: UNet, tx, image_size: int, in_channels: int, ae_abstract) -> base.TrainState:
  # Zeros of the AE's shapes keep the state's structure fixed; the loop puts the trained AE in.
  extras = {'ae_params': jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), ae_abstract)}
  return unet.init(key, model=model, tx=tx, image_size=image_size, in_channels=in_channels, extras=extras)


def ae_config(config) -> config_dict.ConfigDict:
  """The AE that ae_unet uses: its own config as method 'ae' (same data, seed and sizes), trained for
  ``ae_num_train_steps`` at batch ``ae_batch_size``, rate ``ae_learning_rate`` and decay interval
  ``ae_decay_every_steps`` when they are set."""
  ae = config_dict.ConfigDict(config.to_dict(), type_safe=False)
  ae.method = 'ae'
  if config.get('ae_num_train_steps'):
    ae.num_train_steps = config.ae_num_train_steps
  if config.get('ae_batch_size') is not None:
    if int(config.ae_batch_size) <= 0:
      raise ValueError(f'config.ae_batch_size must be a positive batch size (or unset: config.batch_size), '
                       f'got {config.ae_batch_size}.')
    ae.batch_size = config.ae_batch_size
  if config.get('ae_learning_rate'):
    # The AE's own rate as its optim.learning_rate: the AE's config (and a reproduce cell's fingerprint)
    # then no longer depends on the U-Net's rate, so changing that one does not retrain the AE.
    ae.optim.learning_rate = float(config.ae_learning_rate)
  if config.get('ae_decay_every_steps') is not None:
    # Likewise the AE's schedule: the U-Net family's optim.decay_every_steps then no longer reaches it.
    ae.optim.decay_every_steps = autoencoder.decay_every_steps(config, None)
  return ae


def prerequisites(config) -> dict[str, base.Prerequisite]:
  """A trained AE (paper 3.2): in ``config.ae_workdir`` when set, else trained in ``<workdir>/ae``."""
  return {'ae': base.Prerequisite(config=ae_config(config), workdir_key='ae_workdir',
                                  allow_collapsed_key='ae_allow_collapsed')}


CONFIG_KEYS = unet.CONFIG_KEYS + ('model.unet_input', 'model.diff_gate')  # read by some methods only


def create(config, ctx: base.MethodContext, trained: Mapping[str, base.TrainState]) -> base.Method:
  return create_with_ae(config, ctx, trained['ae'].params)


def create_with_ae(config, ctx: base.MethodContext, ae_params) -> base.Method:
  """The method around already trained AE parameters."""
  validate(config)
  mode = config.model.unet_input
  ae_model = autoencoder.create_model(config)
  model = unet.create_model(config)
  tx = base.optimizer_from_config(config, ctx)
  spec = base.augment_spec(config, ctx)
  synth = synthetic.from_config(config)
  in_channels = {'image': 3, 'diff': 3, 'image+diff': 6}[mode]
  ae_abstract = jax.eval_shape(lambda: ae_params)
  sigma = float(config.model.diff_blur)
  tile = ctx.image_size if ctx.texture else None
  # The gate decides whether D is added to the image; fed D alone (Table 4's 'diff'), the U-Net keeps it.
  gate, gate_info = diff_gate(config, ctx, ae_params, ae_model, synth) if mode == 'image+diff' else (1.0, None)
  # diff_gate='best' with |I - M| ranking better: |I - M| in D's place, for every image the U-Net sees.
  mean = None
  if gate_info and gate_info['rule'] == 'best' and not gate_info['open']:
    mean = ctx.unlabeled.astype(np.float64).mean(axis=0).astype(np.float32) / 255.0
  if mode == 'image':
    scale = 1.0
  elif mean is not None:
    scale = aux_scale(config, ctx, partial(stored_differences, ae_params=None, ae_model=ae_model, sigma=sigma,
                                           tile=tile, mean=mean), '|I - M|')
  else:
    scale = diff_scale(config, ctx, ae_params, ae_model)
  stream_fields = None
  aux_fields = partial(stored_differences, ae_params=ae_params, ae_model=ae_model, sigma=sigma, tile=tile,
                       scale=scale, gate=gate, mean=mean)
  if mode != 'image':
    # The AE is frozen, so D of a stored labeled image is the same at every step: computed once here
    # instead of (for a texture) four tiles of AE per image per step.
    stream_fields = {'labeled': {'diff': aux_fields}}
  names, sizes = unet.streams(synth)
  return base.Method(
      name='ae_unet', streams=names, batch_sizes=sizes, score_kind='probability', config_keys=CONFIG_KEYS,
      init=partial(init, model=model, tx=tx, image_size=ctx.image_size, in_channels=in_channels,
                   ae_abstract=ae_abstract),
      train_step=partial(train_step, model=model, ae_model=ae_model, tx=tx, spec=spec, mode=mode, sigma=sigma,
                         tile=tile, scale=scale, gate=gate, synth=synth if synth.enabled else None, mean=mean),
      score_map=partial(score_map, model=model, ae_model=ae_model, mode=mode, sigma=sigma, scale=scale,
                        gate=gate, mean=mean),
      reconstruct=partial(reconstruct, ae_model=ae_model),
      extras={'ae_params': ae_params}, stream_fields=stream_fields,
      info={'diff_gate': gate_info} if gate_info else None)


def stored_differences(images_uint8: np.ndarray, *, ae_params, ae_model: ConvAutoencoder, sigma: float,
                       tile: int | None, scale: float = 1.0, gate: float = 1.0, mean=None,
                       chunk: int = 32) -> np.ndarray:
  """D / scale * gate (or, ``mean`` given, |I - M| / scale) of stored uint8 images (host float32
  [N, S, S, 3]), jitted in chunks of ``chunk``."""
  if mean is None:
    fn = jax.jit(lambda x: stored_difference(base.to_float(x), ae_params, ae_model, sigma, tile) * (gate / scale))
  else:
    fn = jax.jit(lambda x: stored_aux(base.to_float(x), None, ae_model=ae_model, sigma=sigma, tile=tile,
                                      scale=scale, mean=mean))
  out = [np.asarray(fn(images_uint8[i:i + chunk])) for i in range(0, len(images_uint8), chunk)]
  return np.concatenate(out) if out else np.zeros(images_uint8.shape, np.float32)


def diff_scale(config, ctx: base.MethodContext, ae_params, ae_model: ConvAutoencoder) -> float:
  """The divisor of D for config.model.diff_scale: 1, or the 99th percentile of D (every channel and
  pixel) over the unlabeled images, textures tile by tile as evaluated. Deterministic, so training,
  evaluation, prediction and export (all created from the same AE and split) divide by the same number."""
  return aux_scale(config, ctx, partial(stored_differences, ae_params=ae_params, ae_model=ae_model,
                                        sigma=float(config.model.diff_blur),
                                        tile=ctx.image_size if ctx.texture else None), 'D')


def aux_scale(config, ctx: base.MethodContext, maps, name: str) -> float:
  """config.model.diff_scale of an auxiliary map (``maps``: uint8 images -> unscaled maps): 1, or its 99th
  percentile over the unlabeled images."""
  if config.model.diff_scale == 'none':
    return 1.0
  if ctx.unlabeled is None:
    log.info('ae_unet: no unlabeled images in this method context (made without data: a test or a '
             'benchmark), so %s is not scaled (config.model.diff_scale=%r).', name, config.model.diff_scale)
    return 1.0
  diffs = maps(ctx.unlabeled)
  p99 = float(np.percentile(diffs.reshape(-1), 99))
  if not np.isfinite(p99) or p99 <= 0:
    raise ValueError(f'config.model.diff_scale={config.model.diff_scale!r}: the 99th percentile of {name} over the '
                     f'unlabeled images is {p99}; the AE reconstructs them exactly? Set config.model.diff_scale=none.')
  log.info('ae_unet: %s is divided by %.4g (its 99th percentile over %d unlabeled images).', name, p99,
           len(ctx.unlabeled))
  return p99


def diff_gate(config, ctx: base.MethodContext, ae_params, ae_model: ConvAutoencoder,
              synth: synthetic.SynthSpec | None = None) -> tuple[float, dict | None]:
  """(gate, what decided it) for config.model.diff_gate. 'trivial': 1 when D, reduced over channels as the
  AE's score map (config.model.diff_channels), ranks the labeled images' defect pixels better (pixel
  AUROC) than |I - M| does, M the per-pixel mean of the unlabeled images; else 0. 'best': the same
  decision, gate 1 always; ``info['enters']`` names the map that then enters ('D' or '|I - M|').
  Without labeled images (zero-label mode) the ranked pixels are synthetic defects on unlabeled images
  (``synthetic.gate_examples``, config.synth's kinds), ``info['ranked']`` says so. Deterministic like
  the scale, so training, evaluation, prediction and export agree."""
  rule = config.model.get('diff_gate', 'none')
  if rule == 'none':
    return 1.0, None
  if ctx.unlabeled is None or ctx.labeled is None:
    log.info('ae_unet: no labeled or unlabeled images in this method context (made without data: a test or '
             'a benchmark), so D enters ungated (config.model.diff_gate=%r).', rule)
    return 1.0, None
  images, masks, ranked = ctx.labeled.images, ctx.labeled.masks, 'labeled'
  if len(images) == 0:
    if synth is None or not synth.enabled:
      raise ValueError(f'config.model.diff_gate={rule!r} ranks the labeled images\' defect pixels, but there is '
                       'no labeled image (config.data.k_labeled=0); set config.synth.enabled=True (the gate then '
                       'ranks synthetic defects on unlabeled images) or config.model.diff_gate=none.')
    images, masks = synthetic.gate_examples(ctx.unlabeled, synth)
    ranked = 'synthetic'
  masks = masks[..., 0].astype(bool)
  if not masks.any() or masks.all():
    raise ValueError(f'config.model.diff_gate={rule!r} ranks the {ranked} images\' pixels, but their masks '
                     'have no defect pixel (or no normal one); label a defect image or set '
                     'config.model.diff_gate=none.')
  channels = config.model.diff_channels
  d = stored_differences(images, ae_params=ae_params, ae_model=ae_model, sigma=float(config.model.diff_blur),
                         tile=ctx.image_size if ctx.texture else None)
  # |I - M| in float64 (evaluate.trivial_difference's float32 rounding breaks some of its ties otherwise).
  mean = ctx.unlabeled.astype(np.float64).mean(axis=0) / 255.0
  trivial = np.abs(images.astype(np.float64) / 255.0 - mean)
  info = {'rule': rule,
          'd_auroc_labeled': metrics.pixel_auroc(base.reduce_channels(d, channels), masks),
          'trivial_auroc_labeled': metrics.pixel_auroc(base.reduce_channels(trivial, channels), masks)}
  info['open'] = bool(info['d_auroc_labeled'] > info['trivial_auroc_labeled'])
  if ranked != 'labeled':
    info['ranked'] = ranked
  if rule == 'best':
    info['enters'] = 'D' if info['open'] else '|I - M|'
    log.info('ae_unet: D ranks the %s images\' defect pixels at AUROC %.3f, |I - M| at %.3f: %s enters the U-Net '
             '(config.model.diff_gate=%r).', ranked, info['d_auroc_labeled'], info['trivial_auroc_labeled'],
             info['enters'], rule)
    return 1.0, info
  say = log.info if info['open'] else log.warning
  say('ae_unet: D ranks the %s images\' defect pixels at AUROC %.3f, |I - M| at %.3f: D %s the U-Net '
      '(config.model.diff_gate=%r).', ranked, info['d_auroc_labeled'], info['trivial_auroc_labeled'],
      'enters' if info['open'] else 'does not beat the trivial map and enters as zeros into', rule)
  return (1.0 if info['open'] else 0.0), info
