"""Fixtures for the app's tests (builders in ui_fixtures.py)."""

from pathlib import Path

import pytest

from ui_fixtures import CHROMIUM, CHROMIUM_ARGS, make_photos, save_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny SDXL-architecture diffusers folder (32 px), built once per test session."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-sdxl") / "model"))


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    return make_photos(tmp_path / "upload")


@pytest.fixture
def page():
    """A page in headless Chromium (the browser tests; 1280 × 900, downloads accepted)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        yield context.new_page()
        browser.close()
