"""``dorabooth-ui --cluster``: the app's handlers drive a real local Ray cluster (2 CPUs) instead
of the in-process worker — two runs train at once, a stopped run resumes, and the page's
status comes from the run folders the workers write."""

import json
import time

import pytest

from ui import handlers as h
from ui import runs
from ui_fixtures import make_photos, wait_for_run

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("cluster-app")
    ctx = h.make_context(root / "ws", tiny_model, cluster="local")
    h.upload_photos(ctx, "rex", make_photos(root / "up"), "sks", "dog")
    yield ctx
    ctx.close()
    assert not ray.is_initialized()


def _state(ctx, ref):
    return h.run_status(ctx, ref).state


def test_two_runs_train_at_once_on_the_cluster(ctx):
    first = h.start_training(ctx, "rex", h.TrainSettings(preset="quick", steps=20, class_images=2))
    second = h.start_training(ctx, "rex", h.TrainSettings(preset="quick", steps=21, class_images=2))
    assert {ctx.worker.position(ctx.workspace.run(r)) for r in (first, second)} <= {0, 1, 2}
    done = [wait_for_run(ctx, r, timeout=600) for r in (first, second)]
    assert all(s.finished for s in done), [s.message for s in done]
    records = [json.loads((ctx.workspace.root / "queue" / f"{ctx.worker.job_id(ctx.workspace.run(r))}.json")
                          .read_text()) for r in (first, second)]
    (a,), (b,) = (r["attempts"] for r in records)
    assert a["pid"] != b["pid"] and a["started"] < b["ended"] and b["started"] < a["ended"]    # at the same time
    assert ctx.worker.line() == [] and not ctx.worker.busy


def test_stop_and_resume_a_run_on_the_cluster(ctx):
    ref = h.start_training(ctx, "rex", h.TrainSettings(preset="quick", steps=80, class_images=2))
    deadline = time.monotonic() + 600
    while h.run_status(ctx, ref).step < 2 and time.monotonic() < deadline:     # the worker's events, on the page
        time.sleep(0.1)
    assert "Stopping" in h.stop_training(ctx, ref)
    stopped = wait_for_run(ctx, ref, timeout=600)
    assert stopped.state == runs.STOPPED and stopped.resumable, stopped.message
    assert "resum" in h.resume_training(ctx, ref).lower()              # "Resuming." or "Queued to resume: …"
    finished = wait_for_run(ctx, ref, timeout=600)
    assert finished.finished and finished.step == 80, finished.message
