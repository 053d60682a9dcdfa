"""Every table and figure of the paper from one command: trains and evaluates each (category, method,
variant, seed) cell, skipping finished ones, then writes results.csv, report.md and figures/.

Usage:
  python -m experiments.reproduce --config configs/reproduce.py:synthetic --workdir runs/repro
  python -m experiments.reproduce --config configs/reproduce.py:synthetic --workdir /tmp/repro \\
      --config.categories=washer,brick --config.methods=ae,unet,ae_unet --config.seeds=0
  python -m experiments.reproduce --config configs/reproduce.py:mvtec --config.data.root=~/mvtec \\
      --workdir runs/mvtec_repro
"""

from absl import app

from experiments import _main
from semiseg import report, reproduce

_main.define_flags()


def main(argv):
  del argv
  _main.start()
  result = reproduce.reproduce(_main.FLAGS.config, _main.FLAGS.workdir)
  print(f'{len(result.cells_run)} cell(s) run, {len(result.cells_skipped)} already finished; '
        f'report: {result.report_path}')
  print('Table 2: defect-class IoU (test split)')
  print(report.metric_table(result.rows, 'defect_iou'))
  for where, why in result.cells_failed:
    print(f'FAILED {where}: {why}')
  if result.cells_failed:
    raise SystemExit(1)


if __name__ == '__main__':
  app.run(main)
