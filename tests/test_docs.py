"""The user's documents hold together: README.md stays a door (at most 250 lines, the two set-up
commands first), and every relative link in README.md, docs/ and experiments/results/ resolves."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md')),
             *sorted((ROOT / 'experiments' / 'results').glob('*.md'))]


def relative_links(path: pathlib.Path) -> list[str]:
  text = re.sub(r'```.*?```', '', path.read_text(), flags=re.S)  # code blocks hold commands, not links
  return [t for t in re.findall(r'\]\(([^)\s]+)\)', text) if not re.match(r'[a-z]+:', t) and not t.startswith('#')]


def test_links_are_found():
  # The checker reads links the way Markdown writes them (a broken pattern would pass everything).
  assert 'docs/scaling.md' in relative_links(ROOT / 'README.md')


@pytest.mark.parametrize('path', DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
  broken = [t for t in relative_links(path) if not (path.parent / t.split('#')[0]).exists()]
  assert not broken, f'{path.relative_to(ROOT)} links to missing files: {broken}'


def test_readme_is_a_door_with_the_two_set_up_commands_first():
  lines = (ROOT / 'README.md').read_text().splitlines()
  assert len(lines) <= 250
  head = lines[:20]
  assert any(l.startswith('pip install -e . && python -m experiments.reproduce ') for l in head)
  assert "python -m pip install '.[test]' && python -P -m pytest -q tests" in head


def test_no_config_comment_carries_a_result_table():
  for path in sorted((ROOT / 'configs').glob('*.py')):
    for number, line in enumerate(path.read_text().splitlines(), 1):
      comment = line.partition('#')[2]
      assert len(re.findall(r'\d\.\d{3}', comment)) < 3, f'{path.name}:{number} holds results: link a study'
