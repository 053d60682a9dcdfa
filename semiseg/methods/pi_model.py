"""``pi_model``: U-Net, cross-entropy on labeled images + consistency between two views (Laine and Aila 2017)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from semiseg import augment
from semiseg.methods import base, consistency, synthetic, unet
from semiseg.models.unet import UNet


def train_step(state: base.TrainState, batch: base.Batch, *, model: UNet, tx: optax.GradientTransformation,
               spec: augment.AugmentSpec, max_weight: float, rampup_steps: int,
               synth: synthetic.SynthSpec | None = None):
  images, masks = unet.augmented_labeled(state, batch, spec, synth)
  unlabeled = base.to_float(batch['unlabeled']['image'])
  in_hw = tuple(unlabeled.shape[1:3])
  # fold_in(.., 1): independent of the labeled warp, which uses the step key itself.
  v1, v2, m1, m2 = consistency.two_views(jax.random.fold_in(base.step_key(state), 1), unlabeled, spec)
  b, u = images.shape[0], v1.shape[0]
  weight = consistency.rampup_weight(state.step, max_weight, rampup_steps)

  def loss_fn(params):
    # One forward pass over labeled + both views; both views get gradients, as in the Pi-model.
    logits = model.apply(params, jnp.concatenate([images, v1, v2]))
    ce = base.sigmoid_bce(logits[:b], masks)
    probs = jax.nn.sigmoid(logits[b:].astype(jnp.float32))
    agreement = consistency.aligned_consistency(probs[:u], probs[u:], m1, m2, in_hw)
    return ce + weight * agreement, (ce, agreement)

  (loss, (ce, agreement)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return base.apply_updates(state, grads, tx), {'loss': loss, 'ce': ce, 'consistency': agreement,
                                                'consistency_weight': weight}


validate = unet.validate  # the U-Net's size check


CONFIG_KEYS = unet.CONFIG_KEYS + ('consistency',)  # read by some methods only (Method.config_keys)


def create(config, ctx: base.MethodContext) -> base.Method:
  model = unet.create_model(config)
  tx = base.optimizer_from_config(config, ctx)
  spec = base.augment_spec(config, ctx)
  max_weight, rampup_steps = consistency.settings(config)
  synth = synthetic.from_config(config)
  names, sizes = unet.streams(synth, ('labeled', 'unlabeled'), own_unlabeled=config.unlabeled_batch_size)
  return base.Method(
      name='pi_model', streams=names, batch_sizes=sizes, score_kind='probability', config_keys=CONFIG_KEYS,
      init=partial(unet.init, model=model, tx=tx, image_size=ctx.image_size),
      train_step=partial(train_step, model=model, tx=tx, spec=spec, max_weight=max_weight,
                         rampup_steps=rampup_steps, synth=synth if synth.enabled else None),
      score_map=partial(unet.score_map, model=model))
