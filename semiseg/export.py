"""A trained workdir as inference artifacts that run without this package: StableHLO (``jax.export``),
ONNX (jax2onnx, optional) and the meta.json that says how to feed them and read their output.

The exported function is what ``semiseg.predict`` scores with (``evaluate.Scorer``), with the trained
parameters baked in as constants: float32 images ``[B, S, S, 3]`` in [0, 1] at the stored size S
(textures: 2x the network input, tiled and stitched inside) -> float32 ``[B, S, S, 1]``, the defect
probability or the anomaly score. AE + U-Net carries its AE and the difference image. Nothing here
trains.

ONNX needs jax2onnx, which the extra ``export`` installs in one command (``pip install -e '.[export]'``):
0.13.0 is the last release pip can combine with this package's ``orbax-checkpoint>=0.12.8`` (every later
one declares ``orbax-checkpoint<0.11.37``); a later one installed by hand with ``--no-deps`` works too.
A function that does not convert (a primitive without an ONNX rule) raises ``OnnxExportError`` naming
the primitive, after ``model.jaxexport`` and ``meta.json`` are written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import sys
from typing import Callable

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from semiseg import augment, evaluate, fileio, predict, restore

log = logging.getLogger(__name__)

JAXEXPORT, ONNX, META = 'model.jaxexport', 'model.onnx', 'meta.json'
PLATFORMS = ('cpu', 'cuda')
INPUT = 'float32 RGB in [0, 1], resized to stored_size'
INPUT_NAME, OUTPUT_NAME = 'images', 'scores'  # the ONNX graph's input and output
MIN_JAX2ONNX = (0, 13, 0)  # the extra `export`'s pin; 0.17.1 (by hand, --no-deps) converts as well
FLAX_FIRST = (0, 17, 1)  # from this jax2onnx on, its Flax rules are tried first (conversion_order)
ONNX_OPSET = 18  # ONNX Runtime >= 1.14 runs it
ATOL = 1e-4  # largest |ONNX Runtime - jax| accepted on the check images
NUM_CHECK = 2  # test images the ONNX graph is checked on at export
VERSIONED = ('semiseg', 'jax', 'jaxlib', 'flax', 'numpy', 'jax2onnx', 'onnx', 'onnxruntime')


class OnnxExportError(RuntimeError):
  """model.onnx was not written (the message says why); from ``export``, model.jaxexport and meta.json
  were, and ``result`` says so."""

  def __init__(self, message: str, result: 'ExportResult | None' = None):
    super().__init__(message)
    self.result = result


@dataclasses.dataclass
class ExportResult:
  files: dict[str, str]  # artifact name -> path, for what was written
  meta: dict
  onnx_error: str | None  # why model.onnx is missing, None when it was written or not asked for


def inference_fn(method, state, ctx) -> Callable[[jax.Array], jax.Array]:
  """images_BxSxSx3 float32 in [0, 1] -> scores_BxSxSx1 float32, the state closed over (host copies,
  so the trained parameters become constants of the exported program)."""
  state = jax.device_get(state)

  def scores_BxSxSx1(images_BxSxSx3):
    if not ctx.texture:
      scores = method.score_map(state, images_BxSxSx3)[..., None]
    else:  # as evaluate.Scorer: network-size tiles, row-major, stitched back (paper 3.3)
      tiles = method.score_map(state, augment.to_tiles(images_BxSxSx3, ctx.image_size))[..., None]
      scores = augment.from_tiles(tiles, *images_BxSxSx3.shape[:3])
    return scores.astype(jnp.float32)  # also from a bfloat16 model (config.model.dtype)
  return scores_BxSxSx1


def input_spec(stored_size: int) -> jax.ShapeDtypeStruct:
  """float32 [B, S, S, 3] with a symbolic batch B."""
  batch, = jax.export.symbolic_shape('B')
  return jax.ShapeDtypeStruct((batch, stored_size, stored_size, 3), jnp.float32)


def export_stablehlo(fn, stored_size: int, platforms=PLATFORMS) -> bytes:
  """``fn`` lowered for ``platforms`` with a symbolic batch, serialized (``jax.export.deserialize``)."""
  return jax.export.export(jax.jit(fn), platforms=platforms)(input_spec(stored_size)).serialize()


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def _check_jax2onnx() -> tuple[int, ...]:
  """The installed jax2onnx's (major, minor, patch); raises OnnxExportError (how to install) without it."""
  version = _version('jax2onnx')
  hint = "pip install -e '.[export]' (see docs/deploy.md)"
  if version is None:
    raise OnnxExportError(f'model.onnx needs jax2onnx, which is not installed: {hint}.')
  parts = tuple(int(p) if p.isdigit() else 0 for p in version.split('.')[:3])
  if parts < MIN_JAX2ONNX:
    raise OnnxExportError(f'jax2onnx {version} is too old for jax {jax.__version__} (it has no rules for '
                          f'some of its primitives): {hint}.')
  return parts


def conversion_order() -> tuple[str, str]:
  """Which conversion export_onnx tries first: jax2onnx >= 0.17.1 converts the Flax layers (its own
  rules, faster graphs); 0.13.0 fails on ae_unet's after ~15 s of tracing, so the lax program goes first."""
  return ('flax', 'lax') if _check_jax2onnx() >= FLAX_FIRST else ('lax', 'flax')


def _failed_primitive(error: BaseException) -> str | None:
  """The primitive whose ONNX rule failed: the equation the innermost converter frame was lowering, or
  the one named by "No plugins registered for primitive 'x'"."""
  name, tb = None, error.__traceback__
  while tb is not None:
    eqn = tb.tb_frame.f_locals.get('eqn')
    if getattr(eqn, 'primitive', None) is not None:
      name = str(eqn.primitive)
    tb = tb.tb_next
  if name is None and "primitive '" in str(error):
    name = str(error).split("primitive '", 1)[1].split("'", 1)[0]
  return name


@contextlib.contextmanager
def _quiet_converter():
  """jax2onnx logs every plugin import, untyped constant and call (that one on the root logger, at info):
  keep its chatter out of the run's log."""
  names = [n for n in list(logging.root.manager.loggerDict) if n.split('.')[0] in ('jax2onnx', 'onnx_ir')]
  quiet = [(logging.getLogger(n), logging.ERROR) for n in ['jax2onnx', 'onnx_ir'] + names]  # it sets its own
  quiet.append((logging.root, max(logging.root.level, logging.WARNING)))
  levels = [lg.level for lg, _ in quiet]
  for lg, level in quiet:
    lg.setLevel(level)
  try:
    with contextlib.redirect_stdout(sys.stderr):  # its plugins print debug lines
      yield
  finally:
    for (lg, _), level in zip(quiet, levels):
      lg.setLevel(level)


def _onnx_max_diff(data: bytes, fn, images_BxSxSx3: np.ndarray) -> float | None:
  """Largest |ONNX Runtime - jax| over ``images``; None without onnxruntime (nothing to run it with)."""
  try:
    import onnxruntime
  except ImportError:
    return None
  session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
  got = session.run(None, {INPUT_NAME: images_BxSxSx3})[0]
  return float(np.max(np.abs(got - np.asarray(jax.jit(fn)(images_BxSxSx3)))))


# Primitives whose inner program is inlined by _eval_inlined: calls whose sub-jaxpr sits in `jaxpr` or
# `call_jaxpr` and whose inputs are the call's inputs.
_INLINED = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'closed_call': 'call_jaxpr', 'core_call': 'call_jaxpr',
            'custom_jvp_call': 'call_jaxpr'}


def _eval_inlined(jaxpr, consts, *args) -> list:
  """Evaluates a jaxpr equation by equation with the calls inlined and jax's ``stack`` primitive written
  as expand_dims + concatenate: jax2onnx 0.13.0 (the last release pip installs beside
  orbax-checkpoint >= 0.12) has no rule for ``stack``, which jax 0.10 binds for jnp.stack."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jax.extend.core.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == 'stack':
      axis = eqn.params['axis']
      outs = [jax.lax.concatenate([jax.lax.expand_dims(x, (axis,)) for x in invals], axis)]
    elif name in _INLINED and isinstance(eqn.params.get(_INLINED[name]), jax.extend.core.ClosedJaxpr):
      inner = eqn.params[_INLINED[name]]
      outs = _eval_inlined(inner.jaxpr, inner.consts, *invals)
    else:
      outs = eqn.primitive.bind(*invals, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def export_onnx(fn, stored_size: int, path: str, model_name: str, check_images: np.ndarray | None = None) -> dict:
  """``fn`` as one self-contained ONNX file with a symbolic batch at ``path`` (atomic).

  Two conversions, in ``conversion_order()``; the first that converts (and, given ``check_images`` float32
  [N, S, S, 3] and onnxruntime, gives jax's scores within ATOL) is written: 'flax', the function as
  jax2onnx traces it (its own rules for Flax layers: fewer layout transposes, ONNX Runtime 17.6 against
  26.4 ms/image for ae_unet at the CPU config, with jax2onnx 0.17.1), and 'lax', the traced lax program
  (``_eval_inlined``). Raises the lax conversion's ``OnnxExportError`` (it names the primitive) when
  neither does.
  Returns {'conversion', 'max_abs_diff'}.
  """
  order = conversion_order()
  import jax2onnx
  spec = input_spec(stored_size)
  program = jax.make_jaxpr(fn)(spec)
  functions = {'flax': fn, 'lax': lambda images: _eval_inlined(program.jaxpr, program.consts, images)[0]}
  candidates = [(name, functions[name]) for name in order]
  errors = {}
  for conversion, f in candidates:
    try:
      with _quiet_converter():
        proto = jax2onnx.to_onnx(f, inputs=[spec], model_name=model_name, opset=ONNX_OPSET,
                                 input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
      # Its own file mode moves initializers over 1 MB into a .data file named after the file it wrote;
      # they stay inside model.onnx instead (one file, protobuf's 2 GB at most).
      data = proto.SerializeToString()
    except Exception as e:  # pylint: disable=broad-except
      primitive = _failed_primitive(e)
      where = f'primitive {primitive!r}' if primitive else 'an unnamed step'
      first = str(e).strip().splitlines()[0] if str(e).strip() else ''
      error = OnnxExportError(f'ONNX conversion of {model_name} failed at {where}: {type(e).__name__}: {first}')
      error.__cause__ = e
      log.info('%s conversion: %s', conversion, error)
      errors[conversion] = error
      continue
    try:
      diff = None if check_images is None else _onnx_max_diff(data, fn, check_images)
    except Exception as e:  # pylint: disable=broad-except
      # A graph ONNX Runtime refuses to run (jax2onnx's Flax rules have mixed a size-4 axis with the
      # symbolic batch, seen with the 4x4 conv code) is one that disagrees: try the next conversion.
      first = str(e).strip().splitlines()[0] if str(e).strip() else ''
      error = OnnxExportError(f'ONNX Runtime cannot run the {conversion} conversion of {model_name}: '
                              f'{type(e).__name__}: {first[:300]}')
      error.__cause__ = e
      log.info('%s conversion: %s', conversion, error)
      errors[conversion] = error
      continue
    if diff is not None and not diff <= ATOL:
      error = OnnxExportError(f'ONNX Runtime gives scores of {model_name} {diff:.2g} away from jax\'s '
                              f'(more than {ATOL}) on {len(check_images)} image(s)')
      log.info('%s conversion: %s', conversion, error)
      errors[conversion] = error
      continue
    fileio.write_bytes_atomic(path, data)
    return {'conversion': conversion, 'max_abs_diff': diff}
  raise errors['lax']  # the lax program's: its equations name the primitive without a rule


def versions() -> dict[str, str | None]:
  return {dist: _version(dist) for dist in VERSIONED}


def build_meta(method, config, ctx, stored_size: int, threshold: float, threshold_source: str, step: int,
               platforms) -> dict:
  """What a deployment needs besides the artifacts; strict JSON (an infinite threshold is null)."""
  finite = bool(np.isfinite(threshold))
  score = ('defect probability' if method.score_kind == 'probability'
           else 'anomaly score (larger: more likely a defect)')
  return {
      'method': method.name, 'dataset': config.data.name, 'category': config.data.category,
      'image_size': int(config.data.image_size), 'stored_size': int(stored_size), 'texture': bool(ctx.texture),
      'score': method.score_kind, 'threshold': float(threshold) if finite else None,
      'threshold_source': threshold_source + ('' if finite else ' (no score is a defect: null = infinity)'),
      'input': INPUT, 'input_shape': ['B', stored_size, stored_size, 3],
      'output': f'float32 [B, {stored_size}, {stored_size}, 1]: {score}; a pixel is a defect where output >= '
                'threshold',
      'platforms': list(platforms), 'onnx_input': INPUT_NAME, 'onnx_output': OUTPUT_NAME,
      'onnx_opset': ONNX_OPSET, 'onnx_check': None, 'step': int(step), 'versions': versions()}


def write_meta(path: str, meta: dict) -> None:
  fileio.write_text_atomic(path, json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + '\n')


def export(config, workdir: str, out_dir: str, onnx: bool = True, platforms=PLATFORMS) -> ExportResult:
  """Writes ``model.jaxexport``, ``meta.json`` and (``onnx``) ``model.onnx`` into ``out_dir``.

  Raises ``OnnxExportError`` (with the ``ExportResult`` of what was written) when model.onnx cannot be;
  the other two are written all the same.
  """
  run = restore.restore_trained(config, workdir)  # never trains
  method, state, data, ctx, mesh = run.method, run.state, run.data, run.ctx, run.mesh
  scorer = evaluate.Scorer(method, state, ctx, mesh, config.eval_batch_size)
  threshold, source = predict.choose_threshold(method, config, workdir, data, scorer)
  stored_size = 2 * ctx.image_size if ctx.texture else ctx.image_size  # as predict resizes (paper 3.3)
  fn = inference_fn(method, state, ctx)
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name) for name in (JAXEXPORT, ONNX, META)}
  fileio.write_bytes_atomic(paths[JAXEXPORT], export_stablehlo(fn, stored_size, platforms))
  meta = build_meta(method, config, ctx, stored_size, threshold, source, int(jax.device_get(state.step)),
                    platforms)
  files = {JAXEXPORT: paths[JAXEXPORT], META: paths[META]}
  error = None
  if onnx:
    check = data.test.images[:NUM_CHECK] if len(data.test) else data.labeled.images[:NUM_CHECK]
    try:
      meta['onnx_check'] = export_onnx(fn, stored_size, paths[ONNX], method.name,
                                       check_images=check.astype(np.float32) / 255)
      files[ONNX] = paths[ONNX]
    except OnnxExportError as e:
      error = str(e)
  if not onnx or error:
    with contextlib.suppress(FileNotFoundError):
      os.remove(paths[ONNX])  # never leave an older model.onnx beside a newer model.jaxexport
  meta['files'] = sorted(files)
  meta['onnx_error'] = error
  write_meta(paths[META], meta)
  result = ExportResult(files, meta, error)
  if error:
    raise OnnxExportError(f'{error}. Written: {", ".join(sorted(files.values()))}.', result)
  return result
