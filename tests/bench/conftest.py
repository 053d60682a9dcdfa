"""Fixtures of the benchmark's tests: the smoke setting, and single-call samples (no steady state needed)."""

import pytest

from semiseg.bench import suite


@pytest.fixture(autouse=True)
def single_call_samples(monkeypatch):
  from semiseg.bench import timing
  monkeypatch.setattr(timing, 'MIN_SAMPLE_S', 0.0)  # plumbing tests: no need for steady state


@pytest.fixture(scope='module')
def setting():
  from configs import synthetic
  return suite.Setting('smoke', synthetic.get_config('washer,smoke'), repeats=1)
