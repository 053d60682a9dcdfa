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
    choices = (f'a category of {categories} or ' if categories else '') + f'one of {other_words}'
    raise ValueError(f'{where}: unknown arg word(s) {unknown}; use {choices} (or key=value).')
  for w in words:
    if w in categories:
      c.data.category = w


def get_base_config() -> config_dict.ConfigDict:
  """The paper's settings (section 4.2); dataset files override data fields and sizes."""
  c = config_dict.ConfigDict()
  c.method = 'ae_unet'  # one of semiseg.methods.METHODS
  # Set by the arg's recipe=paper | recipe=semiseg (make_config), which also sets the recipe's keys.
  c.recipe = 'paper'
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
  # The split (paper 4.1, Table 1): for every test folder, good included, k_labeled images labeled and
  # test_to_unlabeled moved into the unlabeled set.
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
  # 'dense': the paper's latent vector of latent_dim (Figure 3); 'conv': latent_dim channels at the
  # bottom resolution (a spatial code, which can learn textures).
  c.model.ae_bottleneck = 'dense'
  # 'none': the paper's AE on the image; 'image': on the image standardized per image and channel, its
  # linear head's output mapped back (semiseg/models/autoencoder.py).
  c.model.ae_normalize = 'none'
  # How the score map of a reconstruction method (AE, PCA, AnoGAN; and the trivial |I - M|) reduces
  # |I - reconstruction| over colour channels: 'mean' or 'max' (a defect in one channel at full contrast).
  c.model.diff_channels = 'mean'
  c.model.diff_blur = 0.0  # sigma (px) of a Gaussian blur of D = |I - AE(I)|, as score and U-Net input
  # ae_unet: D into the U-Net as is ('none', the paper) or divided by its 99th percentile over the
  # unlabeled images ('p99'; semiseg/methods/ae_unet.py).
  c.model.diff_scale = 'none'
  # ae_unet with unet_input='image+diff': D enters always ('none', the paper), or only when it ranks the
  # labeled images' defect pixels better than |I - M| ('trivial'; else as zeros, and eval.json's
  # diff_gate says so), or the better of D and |I - M| enters ('best').
  c.model.diff_gate = 'none'
  c.model.unet_features = 64
  c.model.unet_depth = 4
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

  # Synthetic defects with exact masks on unlabeled images in the U-Net methods' batches
  # (semiseg/anomalies.py draws them, semiseg/methods/synthetic.py mixes them in). Off: beside labeled
  # images they cost AE + U-Net 0.06-0.08 test IoU over three seeds; with data.k_labeled=0 and share=1.0
  # they train without labels, far above the AE (experiments/results/synthetic_anomalies.md).
  c.synth = config_dict.ConfigDict()
  c.synth.enabled = False  # unet, ae_unet, pi_model, mean_teacher: train on synthetic defects too
  c.synth.kinds = 'appearance,structure,intensity'  # comma-separated subset of semiseg.anomalies.KINDS
  c.synth.share = 0.5  # of config.batch_size, round(share * batch_size) synthetic; 1.0: no labeled image
  c.synth.strength = 1.0  # scales each defect's opacity (appearance, structure) or amplitude (intensity)
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
  """Sizes a 2-core CPU trains in minutes (experiments/results/cpu_size.md); the recipe is set apart."""
  c.data.image_size = 64
  # Labeled batch 4 halves the U-Nets' step time against 8 at equal quality; the AE keeps 8 (cpu_size.md).
  c.batch_size = 4
  c.ae_batch_size = 8
  # Pi-model and Mean Teacher: 4 unlabeled images beside the labeled batch, 70-80 % of 8's time (cpu_size.md).
  c.unlabeled_batch_size = 4
  c.model.unet_features = 16
  c.model.unet_depth = 3
  # Every U-Net method: 800 steps at 1e-3, x0.8 every 135 steps, so the rate decays 5 times
  # (experiments/results/cpu_size.md; at convergence: experiments/results/table3_convergence.md).
  c.num_train_steps = 800
  c.optim.learning_rate = 1e-3
  c.optim.decay_every_steps = 135
  c.consistency.rampup_steps = 240  # 30 % of the run (Laine and Aila: 80 of 300 epochs)
  # The teacher averages ~20 students (2.5 % of the run); 0.99 lagged and froze at all-background
  # (experiments/results/mean_teacher_teacher.md).
  c.consistency.ema_decay = 0.95
  # The AE: 4 levels, 2000 steps at 1.2e-3, x0.8 every 400 steps, its own schedule so a change of the
  # U-Nets' reuses the trained AE (experiments/results/ae_schedule.md).
  c.model.ae_features = (16, 32, 64, 64)
  c.ae_num_train_steps = 2000
  c.ae_learning_rate = 1.2e-3
  c.ae_decay_every_steps = 400
  c.anogan.latent_dim = 64
  c.anogan.features = (16, 32, 64, 64)
  # AnoGAN: 4000 DCGAN steps at batch 8 and 25 latent search steps per test image fit the main job's
  # budget; more steps lower the reconstruction error slowly (experiments/results/anogan_cpu_budget.md).
  c.anogan.num_train_steps = 4000
  c.anogan.search_steps = 25
  c.anogan.batch_size = 8
  c.log_every_steps = 20
  c.ckpt.every_steps = 200
  return c


SIZES = ('smoke', 'cpu', 'paper')


# The recipes: each key's value under recipe=paper (the paper's text; the base config's value) and under
# recipe=semiseg (the project's measured departure; experiments/results/recipes.md lists them).
RECIPE_KEYS = {
    # GroupNorm after every 3x3 convolution of every U-Net method: the plain U-Net did not fit its
    # labeled images at the CPU budget (experiments/results/normalization.md).
    'model.unet_norm': ('none', 'group'),
    # The AE: a spatial code of 8 channels on per-image standardized inputs, trained without warps; the
    # paper's dense code did not learn the textures (experiments/results/difference_image.md).
    'model.ae_bottleneck': ('dense', 'conv'),
    'model.latent_dim': (500, 8),
    'model.ae_normalize': ('none', 'image'),
    'ae_augment': ('same', 'none'),
    # D blurred by 1 px, reduced by the channel max (colour defects show in one channel) and divided by
    # its 99th percentile for the U-Net (experiments/results/difference_image.md).
    'model.diff_blur': (0.0, 1.0),
    'model.diff_channels': ('mean', 'max'),
    'model.diff_scale': ('none', 'p99'),
    # D enters only where it ranks the labeled images' defect pixels better than |I - M|
    # (experiments/results/diff_gate.md).
    'model.diff_gate': ('none', 'trivial'),
    # AnoGAN's latent search inverts an average of the generators (experiments/results/anogan_cpu_budget.md).
    'anogan.g_ema_decay': (0.0, 0.999),
}
RECIPES = ('paper', 'semiseg')


def apply_recipe(c: config_dict.ConfigDict, recipe: str) -> config_dict.ConfigDict:
  """Sets config.recipe and the recipe's value of every key of RECIPE_KEYS."""
  c.recipe = recipe
  for key, (paper, semiseg) in RECIPE_KEYS.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = paper if recipe == 'paper' else semiseg
  return c


def make_config(arg: str | None, *, where: str, dataset: str, category: str, categories: tuple[str, ...],
                default_size: str, default_recipe: str, sizes: dict | None = None):
  """The one way a dataset file builds its config from the arg: base, category, size, recipe, smoke, pairs.

  ``sizes`` maps a size word to a function run after ``cpu`` (e.g. the folder's larger CPU input).
  Returns the config and the arg's remaining ``key=value`` pairs, to be applied by the caller.
  """
  words, pairs = parse_arg(arg)
  recipe = pairs.pop('recipe', default_recipe)
  if recipe not in RECIPES:
    raise ValueError(f'{where}: recipe={recipe!r} is not a recipe; use recipe=paper or recipe=semiseg.')
  c = get_base_config()
  c.data.name = dataset
  c.data.category = category
  select_category(c, words, categories, SIZES, where)
  size_words = [w for w in words if w in ('cpu', 'paper')]
  if len(size_words) > 1:
    raise ValueError(f'{where}: give one size word (cpu or paper), got {size_words}.')
  size = size_words[0] if size_words else default_size
  if size == 'cpu':
    cpu(c)
  for extra in (sizes or {}).get(size, ()):
    extra(c)
  apply_recipe(c, recipe)
  if 'smoke' in words:
    smoke(c)
  return c, pairs
