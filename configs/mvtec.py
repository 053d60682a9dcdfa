"""MVTec AD, by default as the paper trained it (section 4.2): 256 px (textures 512 -> 256 crops),
batch 16, Adam 1e-4 x0.8 every 30 epochs, 200 epochs, latent 500, U-Net 64 features, depth 4.

Usage (after downloading mvtec_anomaly_detection.tar.xz to ~/mvtec, see the README):
  python -m experiments.train --config configs/mvtec.py:bottle --workdir runs/mvtec/bottle \\
      --config.data.root=~/mvtec
  python -m experiments.train --config configs/mvtec.py:carpet,recipe=semiseg --workdir runs/carpet \\
      --config.data.root=~/mvtec

Arg words: one of the 15 categories (default bottle); a size: ``paper`` (default), ``cpu`` or
``smoke``; ``recipe=paper`` (default: this file reproduces the paper's Table 2 on its dataset) or
``recipe=semiseg`` (the project's measured recipe); ``key=value`` sets any key.
"""

from configs import common
from semiseg.data.categories import MVTEC_CATEGORIES


def get_config(arg: str | None = None):
  where = 'configs/mvtec.py'
  c, pairs = common.make_config(arg, where=where, dataset='mvtec_ad', category='bottle',
                                categories=MVTEC_CATEGORIES, default_size='paper', default_recipe='paper')
  common.apply_pairs(c, pairs, where)
  return c
