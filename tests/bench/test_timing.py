"""Timing helpers: alternating medians, sampled back to back and stopped before a stage's time limit."""

import time


def test_alternating_medians_stops_before_a_time_limit():
  from semiseg.bench import timing
  start = time.monotonic()
  with timing.time_limit(1.0, 'stage'):
    t = timing.alternating_medians({'a': lambda: time.sleep(0.05)}, repeats=1000, min_sample_s=0.05)
  assert 0.05 <= t['a'] < 0.5 and time.monotonic() - start < 1.0


def test_alternating_medians_samples_back_to_back_and_divides():
  from semiseg.bench import timing
  counts = {'a': 0, 'b': 0}

  def a():
    counts['a'] += 1
    time.sleep(0.002)

  def b():
    counts['b'] += 1
    time.sleep(0.02)
  t = timing.alternating_medians({'a': a, 'b': b, 'c': None}, repeats=3, warmup=1, min_sample_s=0.04)
  assert t['c'] is None
  assert 0.002 <= t['a'] < 0.02 and 0.02 <= t['b'] < 0.2
  # a: 1 warm-up + 3 samples of ceil(0.04 / ~0.002) calls (up to 20 each); b: 1 + 3 x 2 (fewer if slow).
  assert counts['a'] >= 1 + 3 * 2 and counts['a'] > counts['b'] and counts['b'] <= 1 + 3 * 2
