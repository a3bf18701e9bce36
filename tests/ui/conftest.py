"""Fixtures for the app's tests (builders in ui_fixtures.py)."""

from pathlib import Path

import pytest

from ui_fixtures import make_photos, save_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny SDXL-architecture diffusers folder (32 px), built once per test session."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-sdxl") / "model"))


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    return make_photos(tmp_path / "upload")
