"""``mean_teacher``: U-Net student + EMA teacher, consistency between their views (Tarvainen and Valpola 2017)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from semiseg import augment
from semiseg.methods import base, consistency, synthetic, unet
from semiseg.methods.base import ema, ema_decay_at
from semiseg.models.unet import UNet


def train_step(state: base.TrainState, batch: base.Batch, *, model: UNet, tx: optax.GradientTransformation,
               spec: augment.AugmentSpec, max_weight: float, rampup_steps: int, ema_decay: float,
               synth: synthetic.SynthSpec | None = None):
  images, masks = unet.augmented_labeled(state, batch, spec, synth)
  unlabeled = base.to_float(batch['unlabeled']['image'])
  in_hw = tuple(unlabeled.shape[1:3])
  v1, v2, m1, m2 = consistency.two_views(jax.random.fold_in(base.step_key(state), 1), unlabeled, spec)
  b = images.shape[0]
  weight = consistency.rampup_weight(state.step, max_weight, rampup_steps)
  # The teacher's view is a target: no gradient reaches the teacher (it is not even a parameter).
  p_teacher = jax.lax.stop_gradient(
      jax.nn.sigmoid(model.apply(state.extras['teacher'], v2).astype(jnp.float32)))

  def loss_fn(params):
    logits = model.apply(params, jnp.concatenate([images, v1]))
    ce = base.sigmoid_bce(logits[:b], masks)
    p_student = jax.nn.sigmoid(logits[b:].astype(jnp.float32))
    agreement = consistency.aligned_consistency(p_student, p_teacher, m1, m2, in_hw)
    return ce + weight * agreement, (ce, agreement)

  (loss, (ce, agreement)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new = base.apply_updates(state, grads, tx)
  # EMA of the updated student (after the optimizer step, as in the paper's Algorithm), warmed up:
  # without it a 0.99 teacher still holds (0.99)^t of its random start after t steps.
  decay = ema_decay_at(new.step, ema_decay)
  new = new.replace(extras={'teacher': ema(state.extras['teacher'], new.params, decay)})
  return new, {'loss': loss, 'ce': ce, 'consistency': agreement, 'consistency_weight': weight, 'ema_decay': decay}


def student_score_map(state: base.TrainState, images_BxHxWx3: jax.Array, *, model: UNet) -> jax.Array:
  return jax.nn.sigmoid(model.apply(state.params, images_BxHxWx3)[..., 0])


def score_map(state: base.TrainState, images_BxHxWx3: jax.Array, *, model: UNet) -> jax.Array:
  """The teacher's probabilities (the better model of the two, per Tarvainen and Valpola)."""
  return jax.nn.sigmoid(model.apply(state.extras['teacher'], images_BxHxWx3)[..., 0])


def init(key: jax.Array, *, model: UNet, tx, image_size: int) -> base.TrainState:
  state = unet.init(key, model=model, tx=tx, image_size=image_size)
  # A copy, not an alias: the loop donates the state, and one buffer must not be donated twice.
  return state.replace(extras={'teacher': jax.tree.map(jnp.copy, state.params)})


validate = unet.validate  # the U-Net's size check


CONFIG_KEYS = unet.CONFIG_KEYS + ('consistency',)  # read by some methods only (Method.config_keys)


def create(config, ctx: base.MethodContext) -> base.Method:
  model = unet.create_model(config)
  tx = base.optimizer_from_config(config, ctx)
  spec = base.augment_spec(config, ctx)
  max_weight, rampup_steps = consistency.settings(config)
  synth = synthetic.from_config(config)
  names, sizes = unet.streams(synth, ('labeled', 'unlabeled'), own_unlabeled=config.unlabeled_batch_size)
  ema_decay = float(config.consistency.ema_decay)
  if not 0 <= ema_decay < 1:
    raise ValueError(f'config.consistency.ema_decay must be in [0, 1), got {ema_decay}.')
  return base.Method(
      name='mean_teacher', streams=names, batch_sizes=sizes, score_kind='probability', config_keys=CONFIG_KEYS,
      init=partial(init, model=model, tx=tx, image_size=ctx.image_size),
      train_step=partial(train_step, model=model, tx=tx, spec=spec, max_weight=max_weight,
                         rampup_steps=rampup_steps, synth=synth if synth.enabled else None, ema_decay=ema_decay),
      score_map=partial(score_map, model=model),
      monitor='teacher_iou_labeled', monitor_maps={'student_iou_labeled': partial(student_score_map, model=model)})
