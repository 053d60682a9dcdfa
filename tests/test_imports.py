"""The import rule of DESIGN.md, read from the source with ``ast`` (function-local imports included).

Imports run one way: experiments -> configs -> semiseg. Inside semiseg no method reaches the loop or
the grid, and evaluation, metrics, prediction and the report never reach training.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'semiseg')
MAX_LINES = 450
TRAINING = {'semiseg.train', 'semiseg.reproduce'}


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
  package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
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


def reachable(start: str) -> set[str]:
  """semiseg modules ``start`` imports, directly or through other semiseg modules."""
  seen, todo = set(), [start]
  while todo:
    for m in IMPORTS.get(todo.pop(), ()):
      if m in FILES and m not in seen:
        seen.add(m)
        todo.append(m)
  return seen


def test_the_library_never_imports_configs_or_experiments():
  bad = {name: sorted(m for m in imports if m.split('.')[0] in ('configs', 'experiments'))
         for name, imports in IMPORTS.items()}
  assert not {k: v for k, v in bad.items() if v}


def test_no_method_reaches_the_loop_or_the_grid():
  methods = [name for name in FILES if name.startswith('semiseg.methods.')]
  assert 'semiseg.methods.ae_unet' in methods
  assert not {m: sorted(reachable(m) & TRAINING) for m in methods if reachable(m) & TRAINING}


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
