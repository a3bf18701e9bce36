"""Shared fixtures: tiny pipelines of each architecture (builders in tests/tiny_models.py)."""

import pytest
import torch

from tiny_models import MAKERS


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(params=["sd15", "sdxl"])
def family_name(request) -> str:
    return request.param


@pytest.fixture
def pipe(family_name):
    """A fresh tiny pipeline of each architecture (SD1.5, SDXL), same weights every time."""
    return MAKERS[family_name]()


@pytest.fixture
def make_pipe(family_name):
    """A factory: `make_pipe()` builds another pipeline identical to `pipe`."""
    return MAKERS[family_name]


def pytest_terminal_summary(terminalreporter):
    """A soft size report (files over 400 lines, functions over 60): printed, never failing."""
    from layering import size_report

    rows = size_report()
    terminalreporter.write_sep("-", f"size report: {len(rows)} file(s)/function(s) over 400/60 lines")
    for row in rows:
        terminalreporter.write_line(row)
