"""Evaluate a trained workdir on its test split; writes <workdir>/eval.json and prints a table.

Usage:
  python -m experiments.evaluate --config configs/synthetic.py:brick --workdir runs/brick
"""

from absl import app

from experiments import _main
from semiseg import evaluate, restore

_main.define_flags()


def main(argv):
  del argv
  _main.start()
  config, workdir = _main.FLAGS.config, _main.FLAGS.workdir
  run = restore.restore_trained(config, workdir)
  out = evaluate.evaluate_run(run, extra=restore.training_health(config, workdir))
  print(evaluate.format_table([out]))


if __name__ == '__main__':
  app.run(main)
