"""Defect maps for new images with a trained workdir: a mask, a score map and an overlay per image.

Usage:
  python -m experiments.predict --config configs/synthetic.py:washer,method=ae_unet \\
      --workdir runs/repro/washer/seed0/ae_unet --input new_images/ --out predictions/
Writes <out>/<name>_mask.png, <name>_score.png (16-bit, score = value / 65535), <name>_overlay.png,
summary.csv (file, defect_pixel_fraction, image_score) and predict.json (threshold, unreadable files).
"""

from absl import app, flags

from experiments import _main
from semiseg import predict

_main.define_flags()
flags.DEFINE_string('input', None, 'An image or a folder of images (any size, grayscale or RGB).', required=True)
flags.DEFINE_string('out', None, 'Output folder.', required=True)


def main(argv):
  del argv
  _main.start()
  FLAGS = _main.FLAGS
  result = predict.predict(FLAGS.config, FLAGS.workdir, FLAGS.input, FLAGS.out)
  print(f'{len(result.rows)} image(s) predicted into {FLAGS.out}; threshold {result.threshold:.4f} '
        f'({result.threshold_source}).')
  for f, why in result.failed:
    print(f'unreadable, skipped: {f} ({why})')


if __name__ == '__main__':
  app.run(main)
