"""Every table and figure of the paper from one command: a dataset config plus the grid to run.

Usage:
  python -m experiments.reproduce --config configs/reproduce.py:synthetic --workdir runs/repro
  python -m experiments.reproduce --config configs/reproduce.py:synthetic,smoke --workdir /tmp/r \\
      --config.categories=washer --config.methods=ae,unet,ae_unet --config.seeds=0
  python -m experiments.reproduce --config configs/reproduce.py:mvtec --config.data.root=~/mvtec \\
      --workdir runs/mvtec_repro

Arg words: the dataset (``synthetic`` (default), ``mvtec`` or ``folder``); every other word and
``key=value`` goes to that dataset's config (``smoke``, ``paper``, ``cpu``, ``batch_size=8``), except
the grid keys below, which may also be set as ``key=value`` (one value: the arg is comma-separated).

Grid keys (comma-separated strings, so ``--config.methods=ae,unet`` works):
  categories: default every category of the dataset (folder: every category under data.root).
  methods: default all seven of the paper; names not in the registry yet are skipped with a warning.
  seeds: default '0,1,2'; ``seed`` sets model init, augmentation and batch order. The split
    (``data.split_seed``) stays fixed, so the spread over seeds is training variance only.
  ablations: Table 4 (U-Net without augmentation, AE + U-Net on the difference image only).

Layout keys (where the cells run; a cell's numbers do not depend on them; docs/scaling.md):
  shard: 'i/n' runs only shard i of n, the grid's (category, seed) groups dealt out by their cell counts
    (n launches, e.g. a SLURM job array, cover the grid once); a shard of several writes no report.
  workers: 1 runs here; N > 1 starts N processes on this host, one shard and one device (GPU, TPU chip,
    or share of the CPU cores) each, then writes the report; 0 trains nothing and writes the report of
    the finished cells (the collecting call after the shards), naming the cells still missing.
"""

from ml_collections import config_dict

from configs import common
from semiseg import methods
from semiseg.grid import GRID_KEYS
from semiseg.data import categories

DATASETS = ('synthetic', 'mvtec', 'folder')


def _base(dataset: str, arg: str):
  if dataset == 'synthetic':
    from configs import synthetic
    return synthetic.get_config(arg)
  if dataset == 'mvtec':
    from configs import mvtec
    return mvtec.get_config(arg)
  from configs import folder
  return folder.get_config(arg)


def get_config(arg: str | None = None):
  words, pairs = common.parse_arg(arg)
  datasets = [w for w in words if w in DATASETS]
  if len(datasets) > 1:
    raise ValueError(f'configs/reproduce.py: give one dataset word, got {datasets}.')
  dataset = datasets[0] if datasets else 'synthetic'
  grid = {k: pairs.pop(k) for k in GRID_KEYS if k in pairs}
  rest = [w for w in words if w not in DATASETS] + [f'{k}={v}' for k, v in pairs.items()]
  c = _base(dataset, ','.join(rest))

  default_categories = {'synthetic': categories.SYNTHETIC_CATEGORIES, 'mvtec': categories.MVTEC_CATEGORIES,
                        'folder': ()}[dataset]
  c.categories = ','.join(default_categories)  # '' (folder): every category under data.root
  c.methods = ','.join(methods.METHODS)
  c.seeds = '0,1,2'
  c.ablations = True
  c.overlay_category = config_dict.placeholder(str)  # unset: the first category
  c.figure_images = 4  # test images (rows) of each Figure 6 grid
  c.shard = '0/1'  # i/n: the cells of shard i of n
  c.workers = 1  # processes on this host; 0: collect the finished cells into the report, train nothing
  common.apply_pairs(c, grid, 'configs/reproduce.py')
  return c
