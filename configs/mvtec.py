"""MVTec AD with the paper's settings (section 4.2): 256 px (textures 512 -> 256 crops), batch 16,
Adam 1e-4 x0.8 every 30 epochs, 200 epochs, latent 500, U-Net 64 features, depth 4.

Usage (after downloading mvtec_anomaly_detection.tar.xz to ~/mvtec, see the README):
  python -m experiments.train --config configs/mvtec.py:bottle --workdir runs/mvtec/bottle \\
      --config.data.root=~/mvtec
  python -m experiments.train --config configs/mvtec.py:carpet,method=unet --workdir runs/carpet_unet

Arg words: one of the 15 categories (default bottle) and ``smoke``; ``key=value`` sets any key.
"""

from configs import common
from semiseg.data.categories import MVTEC_CATEGORIES


def get_config(arg: str | None = None):
  words, pairs = common.parse_arg(arg)
  c = common.get_base_config()
  c.data.name = 'mvtec_ad'
  c.data.category = 'bottle'
  common.select_category(c, words, MVTEC_CATEGORIES, ('smoke',), 'configs/mvtec.py')
  if 'smoke' in words:
    common.smoke(c)
  common.apply_pairs(c, pairs, 'configs/mvtec.py')
  return c
