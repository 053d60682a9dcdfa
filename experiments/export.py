"""A trained workdir as deployable inference artifacts: model.jaxexport (StableHLO), model.onnx, meta.json.

Usage:
  python -m experiments.export --config configs/synthetic.py:washer,method=ae_unet \\
      --workdir runs/repro/washer/seed0/ae_unet --out export/
Input of both models: float32 [B, S, S, 3] RGB in [0, 1] at meta.json's stored_size; output float32
[B, S, S, 1] (defect probability or anomaly score; a defect where >= meta.json's threshold).
docs/deploy.md loads them without this package. model.onnx needs the extra `export` (pip install -e
'.[export]'); exits 1 when it could not be written (the message says why: the converter missing, or the
primitive without an ONNX rule); model.jaxexport and meta.json are written all the same. --noonnx skips it.
"""

import sys

from absl import app, flags

from experiments import _main
from semiseg import export

_main.define_flags()
flags.DEFINE_string('out', None, 'Output folder.', required=True)
flags.DEFINE_bool('onnx', True, 'Also write model.onnx (needs jax2onnx: pip install -e \'.[export]\').')


def main(argv):
  del argv
  _main.start()
  FLAGS = _main.FLAGS
  try:
    result = export.export(FLAGS.config, FLAGS.workdir, FLAGS.out, onnx=FLAGS.onnx)
  except export.OnnxExportError as e:
    print(f'model.onnx not written: {e} Pass --noonnx to export only model.jaxexport and meta.json.',
          file=sys.stderr)
    sys.exit(1)
  meta = result.meta
  print(f'{meta["method"]} (step {meta["step"]}): {", ".join(sorted(result.files.values()))}; input '
        f'[B, {meta["stored_size"]}, {meta["stored_size"]}, 3] in [0, 1], {meta["score"]} >= '
        f'{meta["threshold"]} is a defect.')


if __name__ == '__main__':
  app.run(main)
