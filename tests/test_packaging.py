"""The suite tests the installed package, and the package declares what it imports and imports what it declares.

``.ci/run`` installs a wheel into a fresh virtual environment and sets ``SEMISEG_TEST_INSTALLED=1``;
with it these tests insist that ``semiseg``, ``configs`` and ``experiments`` come from that wheel
(pytest's importlib mode and ``python -P`` keep the checkout off ``sys.path``), so a module left out of
the package or a dependency left out of ``pyproject.toml`` fails CI instead of passing on the checkout.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

import configs
import experiments
import semiseg
from tests.test_imports import imported_modules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {'semiseg': semiseg, 'configs': configs, 'experiments': experiments}
REQUIRE_INSTALLED = os.environ.get('SEMISEG_TEST_INSTALLED') == '1'  # set by .ci/run
# Declared but never imported by name, with the reason.
RUNTIME_ONLY = {
    'flatbuffers': "jax.export's serialization imports it (model.jaxexport, semiseg/export.py); jax leaves it "
                   'undeclared',
    'array-record': "TFDS writes and reads the datasets' array_record files through it (tensorflow-datasets "
                    'pulls it in on Linux only)',
}
# Imported but not declared, with the reason.
NOT_DECLARED = {}
# Where an optional group's modules may be imported besides tests/ (which may import any, skipping
# without them): {extra: path prefixes relative to the root}.
EXTRA_USERS = {'bench': ('semiseg/bench/', 'experiments/benchmark.py'),
               'export': ('semiseg/export.py', 'experiments/export.py'),
               'tb': ('semiseg/tensorboard.py',)}

def normalize(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def requirement_name(requirement: str) -> str:
  return normalize(re.match(r'[A-Za-z0-9._-]+', requirement.strip()).group(0))


def provided_by(top: str, providers) -> set[str]:
  """Normalized names of the distributions that provide the import name ``top``. An optional extra that is
  not installed here (torch in CI) has no metadata to ask: its import name is taken as the
  distribution's, which holds for every optional module this project imports."""
  return {normalize(d) for d in providers.get(top, ())} or {normalize(top)}


def declared() -> dict[str, set[str]]:
  """{'': base dependencies, extra: its dependencies} from pyproject.toml, as normalized names."""
  project = tomllib.load(open(os.path.join(ROOT, 'pyproject.toml'), 'rb'))['project']
  out = {'': {requirement_name(r) for r in project['dependencies']}}
  out.update({k: {requirement_name(r) for r in v} for k, v in project.get('optional-dependencies', {}).items()})
  return out


def source_files() -> list[str]:
  """Paths (relative to the root) of every .py file of the packages and the tests."""
  out = []
  for top in list(PACKAGES) + ['tests']:
    for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
      dirs[:] = sorted(d for d in dirs if not d.startswith(('.', '__')))
      out += sorted(os.path.relpath(os.path.join(folder, f), ROOT) for f in files if f.endswith('.py'))
  return out


def third_party_imports(rel: str) -> set[str]:
  """Top-level names of the modules ``rel`` imports that are neither the standard library nor ours."""
  name = rel[:-len('.py')].replace(os.sep, '.')
  tops = {m.split('.')[0] for m in imported_modules(os.path.join(ROOT, rel), name) if m}
  return {t for t in tops if t not in sys.stdlib_module_names and t not in PACKAGES
          and t not in ('tests', '__future__')}


def distribution():
  try:
    return importlib.metadata.distribution('semiseg')
  except importlib.metadata.PackageNotFoundError:
    return None


def is_editable(dist) -> bool:
  text = dist.read_text('direct_url.json')
  return bool(text) and bool(json.loads(text).get('dir_info', {}).get('editable'))


def test_the_tests_import_the_installed_package():
  dist = distribution()
  if dist is None:
    assert not REQUIRE_INSTALLED, 'semiseg is not installed, but .ci/run installs it before the tests'
    pytest.skip('semiseg is not installed (README: python -m pip install ".[test]")')
  if is_editable(dist):
    assert not REQUIRE_INSTALLED, '.ci/run must install a wheel (python -m pip install ".[test]"), not -e'
    pytest.skip('editable install: the installed package is this checkout')
  for name, module in PACKAGES.items():
    here = os.path.realpath(module.__file__)
    assert here == os.path.realpath(str(dist.locate_file(f'{name}/__init__.py'))), (
        f'{name} was imported from {here}, not from the installed package: is the checkout on sys.path? '
        '(run the tests as the README says: python -P -m pytest -q tests)')
    assert here != os.path.realpath(os.path.join(ROOT, name, '__init__.py'))
  # Subprocesses of the tests (entry points, workers) import the same package.
  out = subprocess.run([sys.executable, '-c', 'import semiseg; print(semiseg.__file__)'], cwd=ROOT,
                       capture_output=True, text=True, check=True)
  assert os.path.realpath(out.stdout.strip()) == os.path.realpath(semiseg.__file__)


def test_the_installed_package_holds_every_module_of_the_source_tree():
  dist = distribution()
  if dist is None or is_editable(dist):
    assert not REQUIRE_INSTALLED
    pytest.skip('no wheel installed (editable or none): its file list is not the package')
  installed = {str(f).replace('/', os.sep) for f in dist.files or ()}
  missing = [f for f in source_files() if not f.startswith('tests' + os.sep) and f not in installed]
  assert not missing, f'left out of the installed package (pyproject.toml [tool.setuptools]): {missing}'


def test_every_imported_module_is_a_declared_dependency():
  deps = declared()
  providers = importlib.metadata.packages_distributions()
  problems = []
  for rel in source_files():
    path = rel.replace(os.sep, '/')
    allowed = set(deps[''])
    for extra, names in deps.items():
      if extra and (path.startswith('tests/') or path.startswith(EXTRA_USERS.get(extra, ()))):
        allowed |= names
    for top in sorted(third_party_imports(rel) - set(NOT_DECLARED)):
      dists = provided_by(top, providers)
      if not dists & allowed:
        problems.append(f'{rel} imports {top} (distribution {sorted(dists) or "not installed"}): declare it in '
                        "pyproject.toml's dependencies, or in an optional group and the group's users in "
                        'EXTRA_USERS here')
  assert not problems, '\n'.join(problems)


def test_every_declared_dependency_is_imported():
  deps = declared()
  providers = importlib.metadata.packages_distributions()
  used = {d for rel in source_files() for top in third_party_imports(rel) for d in provided_by(top, providers)}
  unused = {extra or 'dependencies': sorted(names - used - set(RUNTIME_ONLY)) for extra, names in deps.items()}
  assert not {k: v for k, v in unused.items() if v}, f'declared in pyproject.toml, imported nowhere: {unused}'
  assert set(RUNTIME_ONLY) <= set().union(*deps.values())  # no stale entries here


def test_the_ci_script_runs_the_readme_test_command():
  readme = open(os.path.join(ROOT, 'README.md')).read()
  ci = open(os.path.join(ROOT, '.ci', 'run')).read()
  command = next(line for line in readme.splitlines() if '-m pytest' in line and 'pip install' in line)
  assert command.strip() in ci
  assert 'pip install' not in ci.replace('python -m pip install', ''), '.ci/run installs with python -m pip'
