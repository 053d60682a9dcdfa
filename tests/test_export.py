"""Exported artifacts: model.jaxexport and model.onnx give the scores the Scorer behind predict gives (an
object with a probability method, AE inside; a texture with an anomaly score, tiled inside); AnoGAN's ONNX
error names its primitive and leaves the other two files; end to end through the CLIs, docs/deploy.md's
script in a fresh interpreter without semiseg reproduces predict's score PNGs."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import synthetic
from semiseg import evaluate, export, restore, train
from semiseg.methods import base, create_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AE_UNET = 'washer,smoke,method=ae_unet'  # an object, a probability map, the AE and difference inside
PCA_TEXTURE = 'brick,smoke,method=pca'  # a texture (64 px stored, 32 px tiles), an anomaly score


def _have_onnx() -> bool:
  try:
    export._check_jax2onnx()
  except export.OnnxExportError:
    return False
  return importlib.util.find_spec('onnxruntime') is not None


HAVE_ONNX = _have_onnx()
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="model.onnx needs jax2onnx and onnxruntime: "
                                "pip install -e '.[export]' (the extra test has them too)")


def child_env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TQDM_DISABLE='1')
  env['SEMISEG_JAX_CACHE'] = os.environ['SEMISEG_TEST_JAX_CACHE']
  return env


def run(args: list[str], cwd: str = ROOT) -> subprocess.CompletedProcess:
  proc = subprocess.run(args, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def strict_json(path) -> dict:
  def reject(name):
    raise ValueError(f'{path}: non-standard JSON constant {name}')
  with open(path) as f:
    return json.load(f, parse_constant=reject)


TRAIN = ('import sys; from configs import synthetic; from semiseg import train; '
         'train.train(synthetic.get_config(sys.argv[1]), sys.argv[2], progress=False)')


def ae_unet_job(tmp_path_factory, background):
  """Trained by train.train in a child, then exported through the CLI: both run by the session's
  background thread (conftest.Background), the dataset built here first."""
  from semiseg.data import pipeline
  config = synthetic.get_config(AE_UNET)
  pipeline.load_category(config.data, None)
  wd, out = str(tmp_path_factory.mktemp('ae_unet')), str(tmp_path_factory.mktemp('ae_unet_export'))
  env = child_env()
  env.update(JAX_COMPILATION_CACHE_DIR=os.environ['SEMISEG_TEST_JAX_CACHE'],  # the tests' compilation cache
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  commands = [[sys.executable, '-c', TRAIN, AE_UNET, wd],
              [sys.executable, '-m', 'experiments.export', '--config', f'configs/synthetic.py:{AE_UNET}',
               '--workdir', wd, '--out', out] + ([] if HAVE_ONNX else ['--noonnx'])]

  def run_job():
    for command in commands:
      proc = background.run(command, cwd=ROOT, env=env, timeout=300)
      assert proc.returncode == 0, proc.stderr[-3000:]
    return config, wd, out
  return run_job


BACKGROUND_JOBS = {'ae_unet': ae_unet_job}


@pytest.fixture(scope='module')
def ae_unet(background, tmp_path_factory):
  """Trained and exported (``ae_unet_job``); two of the run's test images at a size of their own (45 x 38)."""
  from semiseg.data import categories, pipeline
  config, wd, out = background.result('ae_unet', ae_unet_job, tmp_path_factory)
  data = pipeline.load_category(categories.apply_category_rules(config).data, wd)  # the run's split
  inputs = tmp_path_factory.mktemp('inputs')
  for i, image in enumerate(data.test.images[:2]):
    Image.fromarray(image).resize((45, 38), Image.BICUBIC).save(inputs / f'part{i}.png')
  return config, wd, out, str(inputs)


@pytest.fixture(scope='module')
def pca_texture(tmp_path_factory):
  config = synthetic.get_config(PCA_TEXTURE)
  wd, out = str(tmp_path_factory.mktemp('pca')), str(tmp_path_factory.mktemp('pca_export'))
  train.train(config, wd, progress=False)
  export.export(config, wd, out, onnx=HAVE_ONNX)
  return config, wd, out, None


@pytest.mark.parametrize('which', ['ae_unet', 'pca_texture'])
def test_artifacts_give_the_scores_of_predict(which, request):
  config, wd, out, _ = request.getfixturevalue(which)
  run = restore.restore_trained(config, wd)
  method, state, data, ctx, mesh = run.method, run.state, run.data, run.ctx, run.mesh
  images = data.test.images[:5]  # uint8 at the stored size: what predict feeds its Scorer
  expected = evaluate.Scorer(method, state, ctx, mesh, config.eval_batch_size)(images)
  x = images.astype(np.float32) / 255
  s = images.shape[1]
  meta = strict_json(os.path.join(out, export.META))
  assert (meta['method'], meta['score'], meta['texture']) == (method.name, method.score_kind, ctx.texture)
  assert (meta['image_size'], meta['stored_size']) == (config.data.image_size, s)
  assert s == (2 * config.data.image_size if ctx.texture else config.data.image_size)
  assert meta['step'] == int(state.step) and meta['input'] == export.INPUT
  assert meta['versions']['jax'] == jax.__version__
  with open(os.path.join(out, export.JAXEXPORT), 'rb') as f:
    exported = jax.export.deserialize(f.read())
  assert exported.platforms == export.PLATFORMS
  assert jax.export.is_symbolic_dim(exported.in_avals[0].shape[0])
  got = np.asarray(exported.call(x))
  assert got.shape == (5, s, s, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got[..., 0], expected, rtol=0, atol=1e-4)  # predict's batches: 8 (padded)
  if HAVE_ONNX:
    import onnxruntime
    session = onnxruntime.InferenceSession(os.path.join(out, export.ONNX))
    onnx_scores = session.run(None, {export.INPUT_NAME: x})[0]
    assert onnx_scores.shape == (5, s, s, 1)
    np.testing.assert_allclose(onnx_scores[..., 0], expected, rtol=0, atol=1e-4)
    assert meta['files'] == sorted([export.JAXEXPORT, export.META, export.ONNX]) and meta['onnx_error'] is None
    assert meta['onnx_check']['max_abs_diff'] <= export.ATOL  # checked at export on two test images


def deploy_script(onnx: bool) -> str:
  """docs/deploy.md's script; without ONNX (no jax2onnx here) its onnxruntime lines left out."""
  with open(os.path.join(ROOT, 'docs', 'deploy.md')) as f:
    doc = f.read()
  section = doc.split('\n## Load and run\n', 1)[1].split('\n## ', 1)[0]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  return code if onnx else '\n'.join(line for line in code.splitlines() if 'onnx' not in line)


def test_end_to_end_deploy_script_matches_predict(ae_unet, tmp_path):
  """The issue's check: export and predict through their CLIs; docs/deploy.md's script, in a fresh interpreter
  that never imports semiseg, loads model.jaxexport (and model.onnx) and gives predict's scores and masks."""
  config, wd, out, inputs = ae_unet
  assert sorted(os.listdir(out)) == sorted([export.JAXEXPORT, export.META] + ([export.ONNX] if HAVE_ONNX else []))
  pred = str(tmp_path / 'predictions')
  run([sys.executable, '-m', 'experiments.predict', '--config', f'configs/synthetic.py:{AE_UNET}',
       '--workdir', wd, '--input', inputs, '--out', pred])
  deploy = tmp_path / 'deploy'
  deploy.mkdir()
  os.symlink(out, deploy / 'export')
  (deploy / 'deploy.py').write_text(deploy_script(HAVE_ONNX))
  images = sorted(os.listdir(inputs))
  for name in images:
    (deploy / name).write_bytes(open(os.path.join(inputs, name), 'rb').read())
  check = ("import runpy, sys; sys.argv = ['deploy.py'] + sys.argv[1:]; runpy.run_path('deploy.py', "
           "run_name='__main__'); own = sorted({m.split('.')[0] for m in sys.modules} & "
           "{'semiseg', 'configs', 'experiments'}); assert not own, own")
  run([sys.executable, '-c', check] + images, cwd=str(deploy))
  assert strict_json(os.path.join(out, export.META))['threshold'] == strict_json(
      os.path.join(pred, 'predict.json'))['threshold']
  for name in images:
    stem = os.path.splitext(name)[0]
    expected = np.asarray(Image.open(os.path.join(pred, f'{stem}_score.png')), np.float64) / 65535
    score = np.asarray(Image.open(deploy / f'{name}.score.tiff'), np.float64)
    assert score.shape == expected.shape == (38, 45)
    np.testing.assert_allclose(np.clip(score, 0, 1), expected, rtol=0, atol=2e-3)
    np.testing.assert_array_equal(np.asarray(Image.open(deploy / f'{name}.mask.png')),
                                  np.asarray(Image.open(os.path.join(pred, f'{stem}_mask.png'))))


@needs_onnx
def test_anogan_onnx_error_names_the_primitive(tmp_path):
  """AnoGAN's latent search draws its start for B rows (random_bits of a symbolic shape) and steps on the
  generator's gradients: no ONNX rules. Conversion depends on the program, not on the values: zeros of the
  state's shapes stand in for a trained one (its eager init takes longer than everything else here)."""
  config = synthetic.get_config('washer,smoke,method=anogan')
  ctx = base.MethodContext(image_size=config.data.image_size, texture=False, steps_per_epoch=1)
  method = create_method(config, ctx)
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(method.init, jax.random.PRNGKey(0)))
  fn = export.inference_fn(method, state, ctx)
  with pytest.raises(export.OnnxExportError, match=r"anogan failed at primitive 'random_bits'"):
    export.export_onnx(fn, config.data.image_size, str(tmp_path / export.ONNX), 'anogan')
  assert os.listdir(tmp_path) == []  # no partial model.onnx


@needs_onnx
def test_onnx_is_one_file_with_large_parameters(tmp_path):
  """Parameters over the converter's 1 MB sidecar threshold (PCA's basis at the CPU config: 25 MB) stay
  inside model.onnx: one file to copy, and none named after a temporary file."""
  import onnxruntime
  w = np.random.default_rng(0).standard_normal((32 * 32 * 3, 128)).astype(np.float32)  # 1.5 MB
  fn = lambda images: images.reshape(images.shape[0], -1) @ w
  export.export_onnx(fn, 32, str(tmp_path / export.ONNX), 'big')
  assert os.listdir(tmp_path) == [export.ONNX]
  x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
  got = onnxruntime.InferenceSession(str(tmp_path / export.ONNX)).run(None, {export.INPUT_NAME: x})[0]
  np.testing.assert_allclose(got, x.reshape(2, -1) @ w, rtol=1e-4, atol=1e-3)


@needs_onnx
def test_a_conversion_that_disagrees_with_jax_is_not_written(tmp_path, monkeypatch):
  """The first conversion's scores off by more than ATOL on the check images: the second one is written;
  both off: an error, and no model.onnx."""
  fn = lambda images: images[..., :1] * 2
  x = np.ones((1, 8, 8, 3), np.float32)
  diffs = iter([1.0, 0.0])
  monkeypatch.setattr(export, '_onnx_max_diff', lambda data, fn, images: next(diffs))
  assert sorted(export.conversion_order()) == ['flax', 'lax']
  assert export.export_onnx(fn, 8, str(tmp_path / export.ONNX), 'twice', check_images=x) == {
      'conversion': export.conversion_order()[1], 'max_abs_diff': 0.0}
  os.remove(tmp_path / export.ONNX)
  monkeypatch.setattr(export, '_onnx_max_diff', lambda data, fn, images: float('nan'))
  with pytest.raises(export.OnnxExportError, match="away from jax's"):
    export.export_onnx(fn, 8, str(tmp_path / export.ONNX), 'twice', check_images=x)
  assert os.listdir(tmp_path) == []


def test_failed_onnx_still_writes_the_rest(pca_texture, tmp_path, monkeypatch):
  """Without the converter: model.jaxexport and meta.json written, a stale model.onnx removed, the error
  (how to install it) raised with the result and recorded in meta.json."""
  config, wd, _, _ = pca_texture
  (tmp_path / export.ONNX).write_bytes(b'an older export')
  monkeypatch.setattr(export, '_version', lambda dist: None)
  with pytest.raises(export.OnnxExportError, match=r"jax2onnx, which is not installed: pip install") as e:
    export.export(config, wd, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [export.META, export.JAXEXPORT]
  meta = strict_json(tmp_path / export.META)
  assert meta['onnx_error'] == e.value.result.onnx_error and 'not installed' in meta['onnx_error']
  assert meta['files'] == [export.META, export.JAXEXPORT] and meta['score'] == 'anomaly'


def test_meta_is_strict_json_with_an_unreachable_threshold(tmp_path):
  config = synthetic.get_config(PCA_TEXTURE)
  method = base.Method(name='pca', streams=('unlabeled',), init=None, score_map=None, score_kind='anomaly')
  ctx = base.MethodContext(image_size=32, texture=True, steps_per_epoch=1)
  meta = export.build_meta(method, config, ctx, 64, float('inf'), 'eval.json', 1, export.PLATFORMS)
  export.write_meta(str(tmp_path / export.META), meta)
  saved = strict_json(tmp_path / export.META)
  assert saved['threshold'] is None and 'infinity' in saved['threshold_source']
  assert (saved['stored_size'], saved['texture'], saved['platforms']) == (64, True, ['cpu', 'cuda'])


@needs_onnx
def test_difference_image_blur_converts_with_a_symbolic_batch(tmp_path):
  """D's Gaussian blur (config.model.diff_blur) repeats the edges by gathering clipped indices: padding
  with jnp.pad(mode='edge') converted into a graph ONNX Runtime refused for a batch of another size
  than the traced one (the CPU preset's ae_unet failed to export that way). Three images, against
  scipy's Gaussian filter with repeated edges."""
  import scipy.ndimage
  from semiseg.methods import autoencoder
  x = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
  result = export.export_onnx(lambda im: autoencoder.blur(im, 1.0), 16, str(tmp_path / 'blur.onnx'), 'blur', x)
  assert result['max_abs_diff'] <= export.ATOL
  import onnxruntime
  session = onnxruntime.InferenceSession(str(tmp_path / 'blur.onnx'), providers=['CPUExecutionProvider'])
  got = session.run(None, {session.get_inputs()[0].name: x})[0]
  want = scipy.ndimage.gaussian_filter(x, (0, 1.0, 1.0, 0), mode='nearest', truncate=3.0)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_lax_program_is_evaluated_without_stack_and_gives_the_same_numbers():
  """jax2onnx 0.13.0 has no rule for jax's `stack` primitive (jnp.stack): the lax conversion evaluates
  the traced program with calls inlined and `stack` as expand_dims + concatenate; against numpy."""
  import jax.numpy as jnp
  fn = lambda x: jax.nn.relu(jax.jit(lambda y: jnp.stack([y, 2 * y, -y], axis=1))(x)).sum(1)
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  program = jax.make_jaxpr(fn)(x)
  assert 'stack' in str(program)
  inlined = lambda v: export._eval_inlined(program.jaxpr, program.consts, v)[0]
  assert 'stack' not in str(jax.make_jaxpr(inlined)(x))
  want = np.maximum(np.stack([x, 2 * x, -x], axis=1), 0).sum(1)
  np.testing.assert_allclose(np.asarray(inlined(x)), want, rtol=1e-6)
