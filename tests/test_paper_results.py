"""The paper's numbers as semiseg.paper_results keys them, checked against the paper's tables as printed
(Sae-ang et al., Sensors 2022), transcribed here in the paper's own row and column order: a number keyed
to the wrong method, category, split or variant fails."""

import pytest

from semiseg import paper_results

# The paper's column titles and category names -> our keys, written out here (not read from semiseg).
METHOD = {'PCA': 'pca', 'AnoGan': 'anogan', 'AE': 'ae', 'Unet': 'unet', 'Π^*': 'pi_model',
          'Mean Teacher': 'mean_teacher', 'AE + Unet': 'ae_unet'}
TABLE3_COLUMNS = [('unet', 'train'), ('unet', 'test'), ('ae_unet', 'train'), ('ae_unet', 'test')]
TABLE4_COLUMNS = {'w/o Data Aug': ('unet', 'no_aug'), 'Data Aug': ('unet', 'main'), 'Diff': ('ae_unet', 'diff'),
                  'Original +Diff': ('ae_unet', 'main')}


def category(name: str) -> str:
  return 'mean' if name == 'Mean Total' else name.lower().replace(' ', '_')


TABLE1 = """\
Category	Bottle	Cable	Capsule	Hazelnut	Metal nut
Unlabeled	217	242	231	401	230
Labeled	4	9	6	5	5
Test	71	123	114	95	100
% Labeled	1.80	3.58	2.53	1.23	2.12
Category	Pill	Screw	Toothbrush	Transistor	Zipper
Unlabeled	283	332	64	223	256
Labeled	8	6	2	5	8
Test	143	142	36	85	127
% Labeled	2.74	1.77	3.03	2.19	3.03
Category	Carpet	Grid	Leather	Tile	Wood
Unlabeled	292	276	257	242	259
Labeled	6	6	6	6	6
Test	396	240	424	396	244
% Labeled	2.02	2.12	2.28	2.42	2.26

"""

TABLE2 = """\
Category	PCA	AnoGan	AE	Unet	Π^*	Mean Teacher	AE + Unet
Bottle	0.131	0.008	0.543	0.606	0.605	0.740	0.655
Cable	0.090	0.001	0.376	0.696	0.695	0.665	0.695
Capsule	0.048	0.023	0.480	0.545	0.544	0.557	0.579
Hazelnut	0.087	0.067	0.437	0.791	0.791	0.769	0.791
Screw	0.006	0.008	0.470	0.587	0.585	0.664	0.589
Pill	0.090	0.075	0.520	0.631	0.650	0.579	0.759
Metal Nut	0.194	0.172	0.519	0.866	0.866	0.568	0.888
Toothbrush	0.070	0.038	0.486	0.544	0.544	0.574	0.542
Transistor	0.102	0.071	0.436	0.560	0.530	0.563	0.605
Zipper	0.035	0.001	0.455	0.722	0.720	0.698	0.730
Grid	0.009	0.008	0.469	0.533	0.561	0.500	0.636
Carpet	0.017	0.020	0.381	0.713	0.630	0.700	0.681
Leather	0.017	0.016	0.462	0.673	0.676	0.666	0.635
Tile	0.096	0.065	0.477	0.603	0.746	0.714	0.674
Wood	0.070	0.057	0.502	0.591	0.570	0.761	0.652
Mean Total	0.071	0.042	0.467	0.644	0.647	0.6478	0.666
"""

TABLE3_ROWS = """\
Bottle	0.980	0.597	0.987	0.655
Cable	0.968	0.628	0.968	0.695
Capsule	0.938	0.553	0.940	0.579
Hazelnut	0.981	0.785	0.980	0.791
Screw	0.940	0.569	0.945	0.589
Pill	0.926	0.597	0.931	0.759
Metal Nut	0.990	0.857	0.990	0.888
Toothbrush	0.968	0.481	0.984	0.542
Transistor	0.984	0.558	0.983	0.605
Zipper	0.966	0.721	0.967	0.730
Grid	0.915	0.580	0.921	0.636
Carpet	0.969	0.598	0.969	0.681
Leather	0.956	0.615	0.955	0.635
Tile	0.966	0.634	0.966	0.674
Wood	0.978	0.579	0.978	0.652
Mean Total	0.961	0.623	0.964	0.666

"""

TABLE4 = """\
Category	w/o Data Aug	Data Aug	Diff	Original +Diff
Bottle	0.583	0.597	0.637	0.655
Cable	0.620	0.628	0.642	0.695
Capsule	0.565	0.553	0.555	0.579
Hazelnut	0.766	0.785	0.701	0.791
Screw	0.590	0.569	0.559	0.589
Pill	0.607	0.597	0.579	0.759
Metal Nut	0.805	0.857	0.882	0.888
Toothbrush	0.478	0.481	0.532	0.542
Transistor	0.574	0.558	0.587	0.605
Zipper	0.731	0.721	0.672	0.730
Grid	0.563	0.580	0.584	0.636
Carpet	0.381	0.598	0.619	0.681
Leather	0.607	0.615	0.666	0.635
Tile	0.595	0.634	0.669	0.674
Wood	0.557	0.579	0.608	0.652
Mean Total	0.614	0.623	0.632	0.666

"""


def rows(text: str) -> list[list[str]]:
  return [line.split('\t') for line in text.splitlines() if line.strip()]


def test_table1_as_printed():
  got = {}
  lines = rows(TABLE1)
  for i in range(0, len(lines), 5):  # three blocks: a header of five categories, then four rows
    names = [category(n) for n in lines[i][1:]]
    for row in lines[i + 1:i + 5]:
      key = {'Unlabeled': 'unlabeled', 'Labeled': 'labeled', 'Test': 'test', '% Labeled': 'percent_labeled'}[row[0]]
      for name, value in zip(names, row[1:]):
        got.setdefault(name, {})[key] = float(value) if key == 'percent_labeled' else int(value)
  assert got == paper_results.TABLE1_SPLIT
  for r in got.values():  # the printed share, to the paper's rounding (it truncates some)
    assert r['percent_labeled'] == pytest.approx(100 * r['labeled'] / (r['unlabeled'] + r['labeled']), abs=0.011)


def test_table2_as_printed():
  header, *body = rows(TABLE2)
  assert [METHOD[t] for t in header[1:]] == list(paper_results.COLUMN_NAMES)  # the registry's (paper's) order
  assert {METHOD[t]: t for t in header[1:]} == paper_results.COLUMN_NAMES
  got = {category(r[0]): {METHOD[t]: float(v) for t, v in zip(header[1:], r[1:])} for r in body}
  assert got == paper_results.TABLE2_DEFECT_IOU


def test_table3_as_printed():
  """Its header spans two lines (Unet, AE + Unet over Train Data, Test Data): the columns are written out."""
  got = {category(r[0]): {c: float(v) for c, v in zip(TABLE3_COLUMNS, r[1:])} for r in rows(TABLE3_ROWS)}
  assert got == paper_results.TABLE3_TRAIN_TEST_IOU


def test_table4_as_printed():
  header, *body = rows(TABLE4)
  columns = [TABLE4_COLUMNS[t] for t in header[1:]]
  got = {category(r[0]): {c: float(v) for c, v in zip(columns, r[1:])} for r in body}
  assert got == paper_results.TABLE4_ABLATION_IOU


def test_the_printed_means_are_kept_where_the_paper_rounds_or_slips():
  """The 'mean' rows are the paper's, not recomputed: AE + U-Net's printed 0.666 is not the mean of its
  fifteen printed rows (0.674); Table 4's no-augmentation mean 0.614 is not theirs either (0.6015)."""
  t2 = paper_results.TABLE2_DEFECT_IOU
  rows_mean = sum(t2[c]['ae_unet'] for c in t2 if c != 'mean') / 15
  assert rows_mean == pytest.approx(0.6741, abs=1e-4) and t2['mean']['ae_unet'] == 0.666
  t4 = paper_results.TABLE4_ABLATION_IOU
  assert sum(t4[c][('unet', 'no_aug')] for c in t4 if c != 'mean') / 15 == pytest.approx(0.6015, abs=1e-4)
  assert t4['mean'][('unet', 'no_aug')] == 0.614
