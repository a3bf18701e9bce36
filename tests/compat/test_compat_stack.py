"""dorabooth on the older supported stack: transformers 4.57.6 + diffusers 0.39.0 + peft 0.21.2.

With transformers 5, stock ``load_lora_weights`` drops text-encoder DoRA magnitudes
(docs/upstream-te-dora.md), so the text-encoder half of the stock interop tests is an
expected failure there. This test builds the older stack in ``.venv-compat/`` (once, then
reused; see make_venv.py) and runs the interop, attach and family tests under it in a
subprocess, where every test, the text-encoder ones included, must pass: exact to 1e-5,
and the stock-to-stock text-encoder round trip bit for bit. It also shows that dorabooth
imports and works at the lower bounds declared in pyproject.toml.

Set ``DORABOOTH_SKIP_COMPAT=1`` to skip it in a quick local run; CI runs it. Building the
venv and running the tests there take minutes, so both say what they are doing on the
terminal as they go, even under ``pytest -q``.
"""

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import make_venv
from make_venv import PINS, ROOT, ensure_venv

FILES = ["tests/test_formats_diffusers.py", "tests/test_inject.py", "tests/test_api.py", "tests/test_families.py"]
MUST_PASS_THERE = ("test_ours_loads_in_stock_diffusers_text_encoders", "test_stock_round_trip_of_text_encoder_dora")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DORABOOTH_SKIP_COMPAT") == "1", reason="DORABOOTH_SKIP_COMPAT=1")
def test_interop_on_the_transformers_4_57_stack(tmp_path, terminal):
    python = str(ensure_venv(log=terminal))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("VIRTUAL_ENV", None)

    versions = subprocess.run(
        [python, "-c", "import transformers, diffusers, peft, dorabooth; "
                       "print(transformers.__version__, diffusers.__version__, peft.__version__)"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.split()
    pinned = {p.split("==")[0]: p.split("==")[1] for p in PINS if "==" in p}
    assert versions == [pinned["transformers"], pinned["diffusers"], pinned["peft"]]

    report = tmp_path / "compat.xml"
    terminal(f"compat: running {len(FILES)} test files under transformers {versions[0]} + diffusers {versions[1]} "
             f"(a few minutes) …")
    start = time.monotonic()
    run = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *FILES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    terminal(f"compat: done in {make_venv._clock(time.monotonic() - start)}")
    assert run.returncode == 0, f"tests failed under the compat stack:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"

    cases = ET.parse(report).getroot().iter("testcase")
    outcome = {f"{c.get('name')}": [child.tag for child in c] for c in cases}
    te_cases = {n: o for n, o in outcome.items() if n.startswith(MUST_PASS_THERE)}
    assert len(te_cases) == 2 * len(MUST_PASS_THERE), te_cases  # sd15 and sdxl each
    assert all(o in ([], ["system-out"], ["system-err"], ["system-out", "system-err"]) for o in te_cases.values()), \
        f"text-encoder interop did not pass under the compat stack: {te_cases}"
    assert not any("skipped" in o for o in outcome.values()), {n: o for n, o in outcome.items() if "skipped" in o}


def test_pins_are_within_the_declared_lower_bounds():
    pyproject = (Path(ROOT) / "pyproject.toml").read_text()
    assert '"transformers>=4.57' in pyproject and '"diffusers>=0.39' in pyproject


@pytest.fixture
def terminal(request):
    """``say(line)``: the line reaches the terminal now, even under ``pytest -q``'s output capture
    (the compat build and run take minutes; a silent ten minutes looked like a hang)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")

    def say(line: str) -> None:
        with capture.global_and_fixture_disabled():
            if reporter is not None:
                reporter.write_line(line)
            else:
                print(line, flush=True)
    return say


def test_a_build_says_what_it_does(tmp_path, monkeypatch, terminal):
    """What the compat build prints, in order, with the commands replaced by quick stand-ins; a
    built venv is reused without a word."""
    lines = []

    def log(line):
        lines.append(line)
        terminal(line)

    def fake_run(cmd, what, log):
        if cmd[1:3] == ["-m", "venv"]:
            make_venv.venv_python(Path(cmd[3])).parent.mkdir(parents=True)
            make_venv.venv_python(Path(cmd[3])).touch()
        log(f"compat venv: {what}: done in 0:00")
    monkeypatch.setattr(make_venv, "_run", fake_run)
    python = ensure_venv(tmp_path / "venv", log=log)
    assert python == tmp_path / "venv" / "bin" / "python"
    assert "2–10 min" in lines[0] and "DORABOOTH_SKIP_COMPAT=1" in lines[0]
    assert [line.split(":")[1].strip() for line in lines[1:-1]] == \
        ["creating the venv", "installing torch==2.13.0", f"installing {len(PINS)} pinned packages"]
    assert lines[-1].startswith("compat venv: ready in")
    lines.clear()
    assert ensure_venv(tmp_path / "venv", log=log) == python and lines == []


def test_a_long_step_reports_while_it_runs(monkeypatch):
    monkeypatch.setattr(make_venv, "HEARTBEAT_S", 0.2)
    lines = []
    make_venv._run([sys.executable, "-c", "import time; time.sleep(1)"], "sleeping", lines.append)
    assert lines[0] == "compat venv: sleeping …" and lines[-1].startswith("compat venv: sleeping: done in 0:0")
    assert any(line.startswith("compat venv: still sleeping (0:0") for line in lines[1:-1])
    with pytest.raises(subprocess.CalledProcessError):
        make_venv._run([sys.executable, "-c", "raise SystemExit(3)"], "failing", lines.append)


def test_progress_reaches_the_terminal_under_pytest_q():
    """The README's `python -m pytest -q` captures test output; the build's lines must still show."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{__file__}::test_a_build_says_what_it_does"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "compat venv: building" in run.stdout and "compat venv: installing torch==2.13.0: done" in run.stdout


def test_the_readme_says_how_long_the_tests_take_and_how_to_skip_this_one():
    readme = (Path(ROOT) / "README.md").read_text()
    tests = readme[readme.index("## Tests"):]
    assert "How long it takes" in tests and "DORABOOTH_SKIP_COMPAT=1 python -m pytest -q" in tests
    assert "python -m pytest -q" in readme.splitlines()[4]          # the second command line stays the tests
