"""Defaults shared by every config, and the one parser for the text after ``:`` in ``--config``.

A config file is selected as ``--config configs/<file>.py:<arg>``. The arg is a comma-separated list
of words and ``key=value`` pairs, e.g. ``bottle,method=ae_unet,smoke``: a bare word that names a
category selects it, ``smoke`` selects the seconds-long CPU variant, ``key=value`` sets a known key.
"""

from __future__ import annotations

from ml_collections import config_dict

def parse_arg(arg: str | None) -> tuple[list[str], dict[str, str]]:
  """Splits ``'bottle,smoke,method=ae'`` into words ``['bottle', 'smoke']`` and ``{'method': 'ae'}``."""
  words, pairs = [], {}
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    if '=' in part:
      key, value = part.split('=', 1)
      pairs[key.strip()] = value.strip()
    else:
      words.append(part)
  return words, pairs


def apply_pairs(config: config_dict.ConfigDict, pairs: dict[str, str], where: str) -> None:
  """Sets ``key=value`` pairs from a config arg, with the type of the existing field."""
  for key, text in pairs.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      if p not in node:
        raise ValueError(f'{where}: unknown config key {key!r} in the config arg.')
      node = node[p]
    if leaf not in node:
      raise ValueError(f'{where}: unknown config key {key!r} in the config arg; '
                       f'known keys here: {sorted(node.keys())}.')
    current = node[leaf]
    field_type = node.get_type(leaf) if hasattr(node, 'get_type') else type(current)
    try:
      if field_type is bool:
        if text.lower() not in ('true', 'false', '1', '0'):
          raise ValueError(text)
        value = text.lower() in ('true', '1')
      elif field_type in (int, float, str):
        value = field_type(text)
      else:
        value = text
    except ValueError as e:
      raise ValueError(f'{where}: config arg {key}={text!r} is not a valid '
                       f'{getattr(field_type, "__name__", field_type)}.') from e
    node[leaf] = value


def select_category(c: config_dict.ConfigDict, words: list[str], categories: tuple[str, ...],
                    other_words: tuple[str, ...], where: str) -> None:
  """Sets the category named among the arg words; rejects unknown words. Its texture handling, border
  and flips follow from it in the library (semiseg/data/categories.py), however it was set."""
  unknown = [w for w in words if w not in categories + other_words]
  if unknown:
    raise ValueError(f'{where}: unknown arg word(s) {unknown}; use a category of {categories} or one of '
                     f'{other_words}.')
  for w in words:
    if w in categories:
      c.data.category = w


def get_base_config() -> config_dict.ConfigDict:
  """The paper's settings (section 4.2); dataset files override data fields and sizes."""
  c = config_dict.ConfigDict()
  c.method = 'ae_unet'  # one of semiseg.methods.METHODS
  c.seed = 0  # model init, augmentation and batch order

  c.data = config_dict.ConfigDict()
  c.data.name = 'synthetic_defects'  # 'synthetic_defects' | 'mvtec_ad' | 'folder'
  c.data.category = 'brick'
  c.data.root = config_dict.placeholder(str)  # folder tree, or MVTec's manual dir (tar.xz or tree)
  c.data.data_dir = config_dict.placeholder(str)  # TFDS data dir; unset: $SEMISEG_DATA_DIR or ~/tensorflow_datasets
  c.data.image_size = 256  # network input; for textures the crop (stored at 2x, paper 3.3)
  # Unset: from the category (semiseg/data/categories.py); set by hand, it must agree with it ('folder':
  # the user's choice, default False).
  c.data.texture = config_dict.placeholder(bool)
  # The split (paper 4.1, Table 1): 'paper' = for every test folder, good included, k_labeled images
  # labeled and test_to_unlabeled moved into the unlabeled set; 'k_per_defect' = k_labeled images per
  # defect type labeled, nothing moved (unlabeled = train/good only).
  c.data.split = 'paper'
  c.data.k_labeled = 1
  c.data.test_to_unlabeled = 2
  c.data.split_seed = 0
  c.data.prefetch = 2  # batches prepared ahead by a background thread

  c.batch_size = 16  # global batch of the method's primary stream
  c.unlabeled_batch_size = 16  # unlabeled part of a semi-supervised batch (pi_model, mean_teacher)
  c.num_epochs = 200
  c.steps_per_epoch = config_dict.placeholder(int)  # unset: ceil(primary stream size / batch_size)
  c.num_train_steps = config_dict.placeholder(int)  # overrides num_epochs * steps_per_epoch
  c.log_every_steps = 50
  c.eval_batch_size = 16

  c.augment = config_dict.ConfigDict()
  c.augment.enabled = True
  c.augment.max_rotation_deg = 15.0
  c.augment.max_translate = 0.1  # fraction of the image side
  # Unset: from the category, like data.texture (flips: off where a mirror image is a defect; border:
  # 'reflect' for textures, else 'constant'; 'edge' is also known to the warp).
  c.augment.flip_x = config_dict.placeholder(bool)
  c.augment.flip_y = config_dict.placeholder(bool)
  c.augment.border = config_dict.placeholder(str)

  c.model = config_dict.ConfigDict()
  c.model.ae_features = (32, 64, 128, 256, 256)  # encoder widths; each level halves H and W
  c.model.latent_dim = 500
  c.model.ae_loss = 'mse'  # 'mse' | 'ssim'
  # 'dense': the paper's latent vector of latent_dim (Figure 3); 'conv': latent_dim channels at the
  # bottom resolution (a spatial code, which can learn textures).
  c.model.ae_bottleneck = 'dense'
  c.model.ae_activation = 'leaky_relu'  # 'leaky_relu' (slope 0.2) | 'relu' | 'elu'
  # 'none': the paper's AE on the image; 'image': on the image standardized per image and channel, its
  # linear head's output mapped back (semiseg/models/autoencoder.py).
  c.model.ae_normalize = 'none'
  # How the score map of a reconstruction method (AE, PCA, AnoGAN; and the trivial |I - M|) reduces
  # |I - reconstruction| over colour channels: 'mean' or 'max' (a defect in one channel at full contrast).
  c.model.diff_channels = 'mean'
  c.model.diff_blur = 0.0  # sigma (px) of a Gaussian blur of D = |I - AE(I)|, as score and U-Net input
  # ae_unet training: D of the warped image ('warped': |W(I) - AE(W(I))|) or of the stored one, warped
  # with it ('stored': W(|I - AE(I)|), textures tile by tile as in evaluation). The paper does not say.
  c.model.diff_on = 'stored'
  # ae_unet: D into the U-Net as is ('none', the paper) or divided by its 99th percentile over the
  # unlabeled images ('p99'; semiseg/methods/ae_unet.py).
  c.model.diff_scale = 'none'
  # ae_unet training: the probability that an image's D is zeroed (its image kept), so the U-Net also
  # learns the defects from the image alone. 0 (the paper): D always enters.
  c.model.diff_dropout = 0.0
  # ae_unet with unet_input='image+diff': D enters always ('none', the paper), or only when it ranks the
  # labeled images' defect pixels better than |I - M| ('trivial'; else as zeros, and eval.json's
  # diff_gate says so).
  c.model.diff_gate = 'none'
  c.model.unet_features = 64
  c.model.unet_depth = 4
  # Defect-pixel prior for the U-Net head's initial bias (0.5 = zero bias). Defects are ~1 % of the
  # pixels; starting there skips the first hundreds of steps spent learning "all background".
  c.model.unet_prior = 0.01
  # 'none': the paper's U-Net (plain 3x3 convolutions and ReLUs); 'group': GroupNorm after each 3x3
  # convolution, for every U-Net method alike (unet, pi_model, mean_teacher, ae_unet).
  c.model.unet_norm = 'none'
  c.model.unet_input = 'image+diff'  # ae_unet: 'image' | 'diff' | 'image+diff' (Table 4)
  c.model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (params stay float32)

  c.optim = config_dict.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.decay_rate = 0.8
  c.optim.decay_every_epochs = 30
  c.optim.decay_every_steps = config_dict.placeholder(int)  # set: overrides decay_every_epochs (CPU runs)

  c.ae_num_train_steps = config_dict.placeholder(int)  # AE of ae_unet; unset: the AE's own epochs
  c.ae_batch_size = config_dict.placeholder(int)  # AE of ae_unet; unset: config.batch_size
  # The AE's own augmentation: 'same' (config.augment), 'flips' (no rotation/translation), 'none'.
  c.ae_augment = 'same'
  c.ae_learning_rate = config_dict.placeholder(float)  # unset: config.optim.learning_rate
  # The AE's own x decay_rate interval; unset: config.optim's (decay_every_steps, else decay_every_epochs).
  c.ae_decay_every_steps = config_dict.placeholder(int)
  # Which AE checkpoint ae_unet (and the ae cell) use: 'last', or 'labeled_auroc' = the one whose D
  # ranks the labeled images' defect pixels best (pixel AUROC, measured at every log step). 'last' by
  # measurement (README, "Choosing the AE checkpoint"): at the CPU config both pick the same AE on washer
  # and pcb, and nearly so on brick (step 1920 of 2000); on grass the selection lifts D from 0.711 to
  # 0.792 (three seeds; an early AE that has not yet learned to reproduce the holes), on gravel it costs
  # 0.008, and AE + U-Net on grass gained 0.03, inside its seeds' spread and still below the U-Net.
  c.ae_select = 'last'
  c.ae_allow_collapsed = False  # ae_unet on an AE whose training collapsed: refused unless True
  c.ae_workdir = config_dict.placeholder(str)  # ae_unet: trained AE; unset: <workdir>/ae, trained first
  c.threshold = 0.5  # score maps of probability methods; fitted rule for anomaly methods
  c.num_bins = 1000  # score histogram bins of the streaming threshold-free metrics
  c.threshold_rule = 'labeled'  # anomaly-score methods: 'labeled' (max TPR-FPR) | 'oracle' | 'fixed'

  c.ckpt = config_dict.ConfigDict()
  c.ckpt.every_steps = 500
  c.ckpt.keep = 2

  # Baselines of Table 2 (paper 4.3). PCA: components by count, or (num_components=0) by kept variance.
  c.pca = config_dict.ConfigDict()
  c.pca.num_components = 0  # 0: choose by config.pca.variance
  c.pca.variance = 0.95  # fraction of the training variance kept when num_components is 0
  c.pca.max_components = 256  # size of the stored basis (fixed before the fit, for checkpoints)

  c.anogan = config_dict.ConfigDict()  # Schlegl et al. 2017 on a DCGAN
  c.anogan.num_train_steps = config_dict.placeholder(int)  # unset: the run's (config.num_train_steps / epochs)
  c.anogan.batch_size = config_dict.placeholder(int)  # unset: config.batch_size
  c.anogan.latent_dim = 100
  c.anogan.features = (32, 64, 128, 256, 256)  # D widths per stride-2 level; G mirrors them
  c.anogan.learning_rate = 2e-4  # Adam, both players (DCGAN's settings)
  c.anogan.b1 = 0.5
  c.anogan.search_steps = 100  # latent search per test image (Adam on z)
  c.anogan.search_learning_rate = 0.05
  c.anogan.discrimination_weight = 0.1  # lambda of (1 - lambda) * residual + lambda * discrimination
  # The latent search inverts an exponential moving average of the generators over training (decay d,
  # warmed up as Mean Teacher's teacher) instead of the last one; 0 (Schlegl et al.): the last generator.
  c.anogan.g_ema_decay = 0.0

  c.consistency = config_dict.ConfigDict()  # pi_model and mean_teacher
  # Max weight of the mean squared probability difference. 10 and 100 (the Pi-model's and Mean Teacher's
  # papers') lowered both methods' test and train IoU on washer and brick, three seeds each (README: "The
  # consistency weight"): the views agree most cheaply on background.
  c.consistency.weight = 1.0
  # Sigmoid ramp-up exp(-5 (1 - t)^2) to the max weight; ~80 epochs as in Laine & Aila at the paper's
  # settings (an epoch is a pass over the unlabeled set: ~14 steps at batch 16).
  c.consistency.rampup_steps = 1000
  c.consistency.ema_decay = 0.99  # mean_teacher: teacher = d * teacher + (1 - d) * student
  return c


def smoke(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Seconds on a CPU: tiny images, tiny networks, a few steps."""
  c.data.image_size = 32
  c.batch_size = 4
  c.unlabeled_batch_size = 4
  c.eval_batch_size = 8
  c.num_train_steps = 4
  c.ae_num_train_steps = 4
  c.ae_batch_size = None
  c.anogan.num_train_steps = None
  c.anogan.batch_size = None
  c.optim.decay_every_steps = None
  c.ae_decay_every_steps = None
  c.log_every_steps = 2
  c.ckpt.every_steps = 2
  c.model.ae_features = (8, 16)
  c.model.latent_dim = 16
  c.model.unet_features = 4
  c.model.unet_depth = 2
  c.pca.max_components = 16
  c.anogan.latent_dim = 16
  c.anogan.features = (8, 16)
  c.anogan.search_steps = 3
  c.consistency.rampup_steps = 2
  c.ae_allow_collapsed = True  # a 4-step AE has not learned anything yet: smoke runs go on regardless
  return c


def cpu(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """The paper's method at a size a 2-core CPU trains in minutes, with the settings measured to work
  there (README: "What makes the difference image useful", "The CPU config")."""
  c.data.image_size = 64
  # The U-Net family's labeled batch: 4 (of 4-5 labeled images, drawn with replacement) runs a step in
  # half the time of 8 and trained as well (three seeds, washer / brick / pcb test defect IoU: U-Net
  # 0.209 / 0.338 / 0.052 at 4 vs 0.197 / 0.252 / 0.073 at 8; AE + U-Net, its AE also at 4, 0.390 /
  # 0.544 / 0.323 vs 0.347 / 0.601 / 0.350). The AE learns from the 210 unlabeled images and keeps 8:
  # at 4 its D ranked pcb's pixels worse (AUROC 0.893 vs 0.915).
  c.batch_size = 4
  c.ae_batch_size = 8
  # Pi-model and Mean Teacher: 4 unlabeled images (two views each) beside the labeled batch.
  # Against 8 on the main job (one seed, labeled batch 8; test defect IoU washer / brick): Pi-model
  # 0.203 / 0.381 vs 0.210 / 0.107, Mean Teacher 0.215 / 0.344 vs 0.218 / 0.491, in 70-80 % of the time.
  c.unlabeled_batch_size = 4
  c.model.unet_features = 16
  c.model.unet_depth = 3
  # GroupNorm in every U-Net method (unet, pi_model, mean_teacher, ae_unet alike): without it the plain
  # U-Net did not fit its 5 labeled images in 800 steps (train defect IoU 0.30-0.61 on washer / brick,
  # loss still -16 to -47 % over the last fifth). With it (three seeds each, test defect IoU, plain ->
  # group): U-Net washer 0.236 -> 0.230, brick 0.266 -> 0.632, pcb 0.055 -> 0.132, grass 0.449 -> 0.468,
  # gravel 0.096 -> 0.234; AE + U-Net washer 0.339 -> 0.386, brick 0.556 -> 0.623, pcb 0.370 -> 0.479
  # (README: "The U-Net family's normalization"). The base (paper) config keeps the plain U-Net.
  c.model.unet_norm = 'group'
  # Every U-Net method (unet, ae_unet, pi_model, mean_teacher): 800 steps at 1e-3, x0.8 every 135 steps
  # (2.5 epochs of the embedded categories' 210 unlabeled images at batch 4), so the rate decays 5 times.
  c.num_train_steps = 800
  c.optim.learning_rate = 1e-3
  c.optim.decay_every_steps = 135
  c.consistency.rampup_steps = 240  # 30 % of the run (Laine and Aila: 80 of 300 epochs)
  # Mean Teacher's teacher averages the last ~1 / (1 - d) students: 20 steps (2.5 % of the run) here, not
  # the base 0.99's 100 (12.5 %). At 0.99 the teacher passed a labeled-image IoU of 0.05 120-300 steps
  # after the student, and on brick seed 0 the student fell back to all-background at step 400 with the
  # teacher still there and never recovered (test IoU 0.000); at 0.95 it follows in 0-60 steps.
  # Six brick seeds, test defect IoU: 0.000-0.512 (mean 0.283) at 0.99, 0.210-0.383 (mean 0.284) at 0.95;
  # washer, three seeds: 0.185 vs 0.189 (README: "Mean Teacher's teacher").
  c.consistency.ema_decay = 0.95
  # The AE: a spatial code (4x4x8 at 64 px) on per-image standardized inputs, no warps, 2000 steps at
  # 2e-3; D blurred by 1 px, taken of the stored image and divided by its 99th percentile for the U-Net.
  # 2000 steps: the AE's loss fell 29 % from step 1000 to 2000 and 3 % from 2000 to 3000 (washer),
  # and D's test pixel AUROC rose with it (seed 0, washer / pcb: 0.917 / 0.942 at 1000 steps, 0.947 /
  # 0.949 at 2000; washer 0.952 at 3000).
  c.model.ae_features = (16, 32, 64, 64)
  c.model.ae_bottleneck = 'conv'
  c.model.latent_dim = 8
  c.model.ae_normalize = 'image'
  c.ae_augment = 'none'
  c.ae_num_train_steps = 2000
  # The AE's schedule: 1.2e-3, x0.8 every 400 of its 2000 steps (the rate ends at 0.33x). The former
  # 2e-3 x0.8 / 135 had decayed to 0.04x while pcb's AE was still learning, and D followed how far each
  # seed got (pcb, five seeds: 0.955 / 0.949 / 0.935 / 0.911 / 0.896 -> 0.960 / 0.960 / 0.955 / 0.961 /
  # 0.950). Three seeds, D's test pixel AUROC, 135 -> 400: washer 0.963 -> 0.973, brick 0.970 -> 0.970,
  # pcb 0.946 -> 0.958, grass 0.708 -> 0.755, gravel 0.665 -> 0.673, every AE at a lower final loss. At
  # 2e-3 x0.8 / 400 the texture AEs' loss spiked after their plateau (gravel to 29 at step 260) and
  # gravel seed 2 ended near-constant (README: "The AE's schedule").
  c.ae_learning_rate = 1.2e-3
  # The AE's schedule is its own, so a change of the U-Net family's schedule (optim.decay_every_steps)
  # reuses the trained AE instead of retraining it on another one.
  c.ae_decay_every_steps = 400
  c.model.diff_blur = 1.0
  # Score maps take the channel max of |I - reconstruction|: the colour defects (pcb's 'color', washer's
  # 'stain') show in one channel, which the mean divides by 3. Same AEs (2000 steps, seed 0), test pixel
  # AUROC mean -> max: washer 0.947 -> 0.959, pcb 0.949 -> 0.956; brick (1000 steps) 0.971 -> 0.970.
  # The trivial |I - M| is reduced alike: 0.833 -> 0.859, 0.780 -> 0.783, 0.888 -> 0.899.
  c.model.diff_channels = 'max'
  c.model.diff_on = 'stored'
  c.model.diff_scale = 'p99'
  # D enters only where it ranks the labeled images' defect pixels better than |I - M| (three seeds, five
  # categories: it does on washer, brick and pcb and never on grass and gravel, whose AEs do not learn
  # the texture). Test defect IoU of AE + U-Net, always -> gated: gravel 0.068 -> 0.269 (U-Net 0.234),
  # grass 0.475 -> 0.453 (U-Net 0.468); washer, brick, pcb unchanged (README: "When D enters").
  c.model.diff_gate = 'trivial'
  c.anogan.latent_dim = 64
  c.anogan.features = (16, 32, 64, 64)
  # Latent search steps per test image, AnoGAN's largest cost (measured against DCGAN steps below).
  c.anogan.search_steps = 25
  # DCGAN steps, washer seed 0, good test images' reconstruction error at 25 / 50 / 100 / 200 search
  # steps (the AE: 0.022; the nearest unlabeled image: 0.051) and the cell's seconds: 1600 steps 0.119 /
  # 0.115 / 0.111 / 0.110, 48 s; 4000: 0.078 / 0.074 / 0.071 / 0.069, 65 s; 8000: 0.063 / 0.058 / 0.054
  # / 0.052, 133 s. Brick at 1600 / 4000 / 8000: 0.094 / 0.098 / 0.072 (AE 0.023). 4000 costs the main
  # job what 1600 did before the faster generator (cells 82 / 110 s); 8000 would add ~70 s per category
  # (README: "AnoGAN at the CPU budget").
  c.anogan.num_train_steps = 4000
  # The search inverts the EMA of the generators (the last ~1000 of 4000 steps). Three seeds, good test
  # images' reconstruction error without -> with it: washer 0.078 / 0.134 / 0.189 -> 0.081 / 0.121 / 0.117,
  # brick 0.098 / 0.085 / 0.087 -> 0.069 / 0.077 / 0.065; pixel AUROC brick 0.76 -> 0.85 (means).
  c.anogan.g_ema_decay = 0.999
  # The DCGAN keeps batch 8: at the U-Nets' 4 a step took as long (the step's fixed costs dominate) and
  # the generator reproduced washer worse (good test images' reconstruction error 0.165 vs 0.110).
  c.anogan.batch_size = 8
  c.log_every_steps = 20
  c.ckpt.every_steps = 200
  return c
