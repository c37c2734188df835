"""The CI's time budget (~15 minutes on 2 cores, where the Triton interpreter runs every kernel): cases that
repeat ground other tests cover are marked `slow` and run only with GSA_SLOW_TESTS=1 (which also keeps
the interpreter's int32 overflow sanitizer on: conftest.py). `python -m pytest -m slow tests` with the variable set runs them alone."""
import os

import pytest

RUN_SLOW = os.environ.get("GSA_SLOW_TESTS", "0") == "1"
SLOW = [pytest.mark.slow, pytest.mark.skipif(not RUN_SLOW, reason="repeats covered ground (CI time): GSA_SLOW_TESTS=1")]


def slow_param(*values, **kwargs):
    """A pytest.param that runs only with GSA_SLOW_TESTS=1."""
    return pytest.param(*values, marks=SLOW, **kwargs)


def slow(test):
    """Decorator: the test runs only with GSA_SLOW_TESTS=1."""
    for mark in SLOW:
        test = mark(test)
    return test
