"""The rules of DESIGN.md (and STYLE.md) that the source shows, read with ``ast`` (function-local imports
included).

Imports run one way: experiments -> configs -> semiseg. Inside semiseg no method reaches the loop, the
grid or evaluation; evaluation, metrics, prediction and the report never reach training; the loop,
checkpointing, sharding and evaluation import no single method; no function-local import hides a
cycle; no library file is over 450 lines or named like the standard library; no pmap; no TensorFlow.
"""

import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'semiseg')
MAX_LINES = 450
TRAINING = {'semiseg.train', 'semiseg.reproduce'}
# Evaluation and what renders or serves its results: no method reaches any of them.
EVALUATION = {'semiseg.evaluate', 'semiseg.monitor', 'semiseg.report', 'semiseg.grid_report', 'semiseg.figures',
              'semiseg.predict', 'semiseg.export', 'semiseg.restore'}
# The shared machinery: it knows methods through the registry (semiseg.methods) and base.py only.
SHARED = ('semiseg.train', 'semiseg.run', 'semiseg.restore', 'semiseg.checkpoint', 'semiseg.sharding',
          'semiseg.evaluate', 'semiseg.monitor')


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len('.py')].replace(os.sep, '.')
  return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def library_files() -> dict[str, str]:
  """{module name: path} of every .py file under semiseg/."""
  out = {}
  for folder, dirs, files in os.walk(PACKAGE):
    dirs[:] = sorted(d for d in dirs if not d.startswith(('.', '__')))
    for f in sorted(files):
      if f.endswith('.py'):
        out[module_name(os.path.join(folder, f))] = os.path.join(folder, f)
  return out


def imported_modules(path: str, name: str) -> set[str]:
  """Every module an ``import`` or ``from ... import`` anywhere in the file names; ``from a import b``
  gives both ``a`` and ``a.b`` (b may be a module)."""
  return _names(ast.parse(open(path).read(), path), path, name)


def local_imports(path: str, name: str) -> set[str]:
  """The modules imported inside a function (or lambda) body of the file."""
  out = set()
  for fn in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      out |= _names(fn, path, name)
  return out


def _names(tree, path: str, name: str) -> set[str]:
  package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      out.add(base)
      out.update(f'{base}.{alias.name}' for alias in node.names)
  return out


FILES = library_files()
IMPORTS = {name: imported_modules(path, name) for name, path in FILES.items()}
LOCAL_IMPORTS = {name: local_imports(path, name) for name, path in FILES.items()}


def reachable(start: str) -> set[str]:
  """semiseg modules ``start`` imports, directly or through other semiseg modules."""
  seen, todo = set(), [start]
  while todo:
    for m in IMPORTS.get(todo.pop(), ()):
      if m in FILES and m not in seen:
        seen.add(m)
        todo.append(m)
  return seen


def test_configs_never_import_experiments():
  bad = {}
  for path in glob.glob(os.path.join(ROOT, 'configs', '*.py')):
    name = module_name(path)
    found = sorted(m for m in imported_modules(path, name) if m.split('.')[0] == 'experiments')
    if found:
      bad[name] = found
  assert not bad


def test_the_library_never_imports_configs_or_experiments():
  bad = {name: sorted(m for m in imports if m.split('.')[0] in ('configs', 'experiments'))
         for name, imports in IMPORTS.items()}
  assert not {k: v for k, v in bad.items() if v}


def test_no_method_reaches_the_loop_or_the_grid():
  methods = [name for name in FILES if name.startswith('semiseg.methods.')]
  assert 'semiseg.methods.ae_unet' in methods
  assert not {m: sorted(reachable(m) & TRAINING) for m in methods if reachable(m) & TRAINING}


def test_no_method_imports_evaluation():
  """A method says how it trains and scores; evaluation runs methods, never the other way (a measure both
  need, pixel_auroc, lives in semiseg.metrics)."""
  methods = [name for name in FILES if name.startswith('semiseg.methods.')]
  assert not {m: sorted(reachable(m) & EVALUATION) for m in methods if reachable(m) & EVALUATION}


def test_the_shared_machinery_imports_no_single_method():
  single = {f'semiseg.methods.{m}' for m in ('pca', 'anogan', 'autoencoder', 'unet', 'pi_model', 'mean_teacher',
                                             'ae_unet')}
  assert single <= set(FILES)
  assert not {m: sorted(IMPORTS[m] & single) for m in SHARED if IMPORTS[m] & single}


def test_no_function_local_import_hides_a_cycle():
  """``def f(): from semiseg import b`` in module a, where b imports a (directly or not), is a dependency
  running the wrong way (STYLE.md): move what both need where both can import it at the top."""
  hidden = {name: sorted(m for m in local if m in FILES and name in reachable(m))
            for name, local in LOCAL_IMPORTS.items()}
  assert not {k: v for k, v in hidden.items() if v}


def test_no_library_module_is_named_like_the_standard_library():
  clash = sorted(name for name in FILES if name.rpartition('.')[2] in sys.stdlib_module_names)
  assert not clash


def test_no_pmap_and_no_tensorflow():
  """One data-parallel mesh (jax.jit over shardings), and TFDS without TensorFlow."""
  bad = {}
  for name, path in FILES.items():
    tree = ast.parse(open(path).read(), path)
    pmap = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == 'pmap']
    tf = sorted(m for m in IMPORTS[name] if m.split('.')[0] == 'tensorflow')
    if pmap or tf:
      bad[name] = (pmap, tf)
  assert not bad


@pytest.mark.parametrize('module', ['semiseg.report', 'semiseg.evaluate', 'semiseg.metrics', 'semiseg.predict',
                                    'semiseg.figures', 'semiseg.restore'])
def test_evaluation_prediction_and_reports_never_reach_training(module):
  assert not reachable(module) & TRAINING


def test_the_rule_sees_function_local_imports(tmp_path):
  path = tmp_path / 'probe.py'
  path.write_text('def f():\n  from semiseg import train\n  import configs.common\n')
  assert {'semiseg.train', 'configs.common'} <= imported_modules(str(path), 'semiseg.probe')


def test_no_library_file_is_over_the_line_limit():
  long = {name: n for name, path in FILES.items() if (n := sum(1 for _ in open(path))) > MAX_LINES}
  assert not long, f'over {MAX_LINES} lines: {long}'


def test_the_report_imports_no_jax():
  code = ('import sys, semiseg.report, semiseg.figures; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "optax", "orbax")))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True)
  assert out.stdout.strip() == '[]'
