"""Report tables: mean ± std over seeds against numpy, CSV round trip, rows of an eval, paper columns."""

import math

import numpy as np
import pytest

from semiseg import figures, metrics, paper_results, report


def hand_rows():
  """2 categories x 2 methods x 3 seeds, known defect IoUs; seed 2 of (b, unet) missing."""
  rng = np.random.default_rng(0)
  values = {(c, m, s): float(rng.uniform()) for c in ('a', 'b') for m in ('unet', 'ae_unet') for s in (0, 1, 2)}
  del values[('b', 'unet', 2)]
  rows = []
  for (c, m, s), v in values.items():
    base = dict(dataset='synthetic_defects', category=c, method=m, seed=s, ms_per_image=1.0,
                **{k: 0.5 for k in metrics.METRIC_NAMES})
    rows.append({**base, 'variant': 'main', 'split': 'test', 'defect_iou': v})
    rows.append({**base, 'variant': 'main', 'split': 'train', 'defect_iou': 1 - v})
  return rows, values


def test_seed_stats_match_numpy():
  rows, values = hand_rows()
  stats = report.seed_stats(rows, 'defect_iou')
  for c in ('a', 'b'):
    for m in ('unet', 'ae_unet'):
      v = [values[(c, m, s)] for s in (0, 1, 2) if (c, m, s) in values]
      assert stats[(c, m)].mean == pytest.approx(np.mean(v))
      assert stats[(c, m)].std == pytest.approx(np.std(v, ddof=1))
      assert stats[(c, m)].n == len(v)
  train = report.seed_stats(rows, 'defect_iou', split='train')
  assert train[('a', 'unet')].mean == pytest.approx(1 - stats[('a', 'unet')].mean)


def test_mean_row_is_over_seeds_of_the_category_mean():
  rows, values = hand_rows()
  means = report.category_mean_stats(rows, 'defect_iou', ['a', 'b'])
  per_seed = [np.mean([values[(c, 'ae_unet', s)] for c in 'ab']) for s in (0, 1, 2)]
  assert means['ae_unet'].mean == pytest.approx(np.mean(per_seed))
  assert means['ae_unet'].std == pytest.approx(np.std(per_seed, ddof=1))
  assert means['unet'].n == 2  # seed 2 lacks category b: left out of the mean


def test_table_text_shows_mean_pm_std():
  rows, values = hand_rows()
  text = report.metric_table(rows, 'defect_iou')
  v = [values[('a', 'unet', s)] for s in (0, 1, 2)]
  assert f'{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}' in text
  assert text.splitlines()[0] == '| category | unet | ae_unet |'
  assert report.fmt(report.stat([0.25])) == '0.250'  # one seed: the value alone
  assert report.fmt(report.stat([])) == '–'


def test_paper_columns_for_mvtec():
  rows, _ = hand_rows()
  rows = [{**r, 'category': 'bottle' if r['category'] == 'a' else 'wood'} for r in rows]
  text = report.metric_table(rows, 'defect_iou', paper=paper_results.TABLE2_DEFECT_IOU)
  assert 'paper AE + Unet' in text and 'paper Unet' in text
  assert '0.655' in text and '0.652' in text and '0.666' in text  # bottle, wood, mean of AE + Unet
  t1 = report.table1({'bottle': {'unlabeled': 217, 'labeled': 4, 'test': 71}}, True)
  assert t1.endswith('| bottle | 217 | 4 | 71 | 1.81 | 217 | 4 | 71 | 1.80 |')  # the paper truncates 1.81


def test_csv_round_trip_and_rows_of_an_eval(tmp_path):
  res = {k: 0.1 for k in metrics.METRIC_NAMES}
  ev = {'test': {**res, 'image_auroc': math.nan}, 'train': res, 'oracle': {'threshold': 0.3, 'test': res},
        'ms_per_image': {'batch_1': 2.0, 'batch_16': 0.5, 'device': 'cpu'}}
  rows = report.rows_from_eval(ev, 'mvtec_ad', 'bottle', 'ae', 'main', 3)
  assert [(r['split'], r['variant']) for r in rows] == [('test', 'main'), ('train', 'main'), ('test', 'oracle')]
  assert rows[0]['ms_per_image'] == 2.0
  path = str(tmp_path / 'r.csv')
  report.write_csv(path, rows, report.RESULT_COLUMNS)
  back = report.read_csv(path)
  assert list(back[0]) == list(report.RESULT_COLUMNS)
  assert back[0]['seed'] == 3 and math.isnan(back[0]['image_auroc']) and back[1]['defect_iou'] == 0.1
  t = report.timing_from_eval(ev, 'mvtec_ad', 'bottle', 'ae', 'main', 3)
  assert (t['ms_batch_1'], t['batch_n'], t['ms_batch_n'], t['device']) == (2.0, 16, 0.5, 'cpu')


def test_figure_indices_take_one_defect_type_at_a_time():
  masks = np.zeros((6, 4, 4, 1), np.uint8)
  masks[[1, 2, 3, 5]] = 1
  types = ['good', 'crack', 'crack', 'hole', 'good', 'crack']
  assert figures.figure_indices(types, masks, 2) == [1, 3]
  assert figures.figure_indices(types, masks, 10) == [1, 2, 3, 5]


def test_convergence_row_means_the_loss_over_the_last_windows_by_hand():
  """Loss logged to step 100: the window (70 %, 80 %] holds steps 75 and 80, the end
  window (90 %, 100 %] steps 95 and 100; records without a loss (or a non-finite one) are skipped."""
  records = [{'step': s, 'loss': 10.0} for s in range(10, 70, 10)]
  records += [{'step': 75, 'loss': 3.0}, {'step': 80, 'loss': 5.0}, {'step': 85, 'loss': 9.0},
              {'step': 90, 'loss': 7.0}, {'step': 95, 'loss': 1.0}, {'step': 98, 'loss': float('nan')},
              {'step': 99, 'other': 1.0}, {'step': 100, 'loss': 3.0}]
  row = report.convergence_row(records)
  assert row == {'steps': 100, 'loss_80': 4.0, 'loss_100': 2.0, 'change': -0.5}
  assert report.convergence_row([{'step': 1}]) is None
  table = report.convergence_table([{'category': 'washer', 'method': 'unet', **row}])
  assert '| washer | 4 → 2 (-50 %) |' in table


# The paper's column titles, written out from the paper (Tables 2, 3 and 4), and what each one holds:
# (table, paper_results key). Not read from semiseg, so a title keyed to the wrong method fails here.
PAPER_COLUMNS = {
    'Table 2:': {'paper PCA': 'pca', 'paper AnoGan': 'anogan', 'paper AE': 'ae', 'paper Unet': 'unet',
                 'paper Π^*': 'pi_model', 'paper Mean Teacher': 'mean_teacher', 'paper AE + Unet': 'ae_unet'},
    'Table 3:': {'paper U-Net train': ('unet', 'train'), 'paper U-Net test': ('unet', 'test'),
                 'paper AE + U-Net train': ('ae_unet', 'train'), 'paper AE + U-Net test': ('ae_unet', 'test')},
    'Table 4:': {'paper w/o Data Aug': ('unet', 'no_aug'), 'paper Data Aug': ('unet', 'main'),
                 'paper Diff': ('ae_unet', 'diff'), 'paper Original + Diff': ('ae_unet', 'main')},
}
PAPER_TABLES = {'Table 2:': paper_results.TABLE2_DEFECT_IOU, 'Table 3:': paper_results.TABLE3_TRAIN_TEST_IOU,
                'Table 4:': paper_results.TABLE4_ABLATION_IOU}


def markdown_columns(report_md: str, section: str) -> dict[str, dict[str, str]]:
  """The first table under the '## <section>' heading of a rendered report: column title -> {row label -> cell}."""
  text = report_md.split(f'\n## {section}', 1)[1].split('\n## ', 1)[0]
  lines = [line for line in text.splitlines() if line.startswith('|')]
  cells = [[c.strip() for c in line.strip('|').split('|')] for line in lines]
  header, body = cells[0], cells[2:]
  assert len(set(header)) == len(header), header
  return {title: {row[0].strip('*'): row[i] for row in body} for i, title in enumerate(header)}


def test_every_paper_column_of_tables_2_3_4_read_back_by_its_title():
  """An MVTec report with every method, split and ablation on all 15 categories: each paper column, found by
  its title in the rendered Markdown, holds paper_results' number for its method (and split or variant) in
  every category row and in the mean row; each Table 2 paper column stands right after its method's own."""
  categories = list(paper_results.TABLE1_SPLIT)
  rows = []
  for i, c in enumerate(categories):
    for j, m in enumerate(paper_results.COLUMN_NAMES):
      variants = {'unet': ('main', 'no_aug'), 'ae_unet': ('main', 'diff')}.get(m, ('main',))
      for variant in variants:
        for split in ('test', 'train'):
          rows.append({**{k: 0.5 for k in metrics.METRIC_NAMES}, 'dataset': 'mvtec_ad', 'category': c,
                       'method': m, 'seed': 0, 'variant': variant, 'split': split, 'ms_per_image': 1.0,
                       'defect_iou': 0.001 * (i + 20 * j) + (0.0005 if split == 'train' else 0.0)})
  text = report.build_markdown(dataset='mvtec_ad', rows=rows, timing=[], counts=paper_results.TABLE1_SPLIT,
                               figures={}, overlay_dir=None, notes=[])
  for section, titles in PAPER_COLUMNS.items():
    columns = markdown_columns(text, section)
    assert sorted(t for t in columns if t.startswith('paper ')) == sorted(titles), (section, list(columns))
    for title, key in titles.items():
      assert list(columns[title]) == categories + ['mean'], (section, title)
      for c in categories + ['mean']:
        want = PAPER_TABLES[section][c][key]
        assert abs(float(columns[title][c]) - want) <= 5e-4, (section, title, c, columns[title][c], want)
  header = list(markdown_columns(text, 'Table 2:'))
  for title, m in PAPER_COLUMNS['Table 2:'].items():
    assert header[header.index(title) - 1] == m, (title, header)
