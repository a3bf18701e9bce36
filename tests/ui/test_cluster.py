"""``dorabooth-ui --cluster``: the app's handlers drive a real local Ray cluster (2 CPUs) instead
of the in-process worker — two runs train at once, a stopped run resumes, and the page's
status comes from the events the workers stream to the queue's keeper (``ClusterWorker.events``),
merged with a run's file history without doubles (``RunStream``)."""

import json
import time
from pathlib import Path

import pytest

from dorabooth import events as events_module
from ui import handlers as h
from ui import runs
from ui.cluster import RunStream, job_id
from ui_fixtures import make_photos, wait_for_run


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_model):
    ray = pytest.importorskip("ray")
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


def test_stop_and_resume_a_run_on_the_cluster(ctx, monkeypatch):
    """…with the page fed by the keeper's stream alone: the app is shown no ``events.jsonl`` (as
    on a machine that does not share the workers' files), yet follows the run to its end."""
    looked = []
    monkeypatch.setattr(events_module, "read_events", lambda path: looked.append(Path(path)) or [])
    ref = h.start_training(ctx, "rex", h.TrainSettings(preset="quick", steps=80, class_images=2))
    run = ctx.workspace.run(ref)
    deadline = time.monotonic() + 600
    while h.run_status(ctx, ref).step < 2 and time.monotonic() < deadline:     # the worker's events, on the page
        time.sleep(0.1)
    training = h.run_status(ctx, ref)
    assert training.state == runs.TRAINING and training.losses and training.it_s and training.total == 80
    assert "Stopping" in h.stop_training(ctx, ref)
    stopped = wait_for_run(ctx, ref, timeout=600)
    assert stopped.state == runs.STOPPED and stopped.resumable, stopped.message
    assert "resum" in h.resume_training(ctx, ref).lower()              # "Resuming." or "Queued to resume: …"
    finished = wait_for_run(ctx, ref, timeout=600)
    assert finished.finished and finished.step == 80, finished.message
    assert [p.resolve() for p in looked] == [(run / "events.jsonl").resolve()]    # once, when first queued: nothing
    monkeypatch.undo()                                  # the file the workers wrote says the same
    on_disk = runs.read_status(run)
    assert (on_disk.state, on_disk.step, on_disk.samples) == (finished.state, finished.step, finished.samples)


def test_the_app_on_an_object_store_workspace(ctx, tmp_path, tiny_model):
    """``--workspace file://…`` with the cluster (an object store's code paths: the app reaches the
    store through fsspec only): a run from the page trains in a worker's scratch folder into the
    store; the page follows it from the stream and shows its previews from the app's mirror, and
    Generate uses the finished adapter there. A restarted app on an empty mirror finds it again."""
    url = (tmp_path / "store").as_uri()
    app = h.make_context(url, tiny_model, cluster="local", mirror=tmp_path / "mirror")   # ctx's cluster
    h.upload_photos(app, "rex", make_photos(tmp_path / "up"), "sks", "dog")
    ref = h.start_training(app, "rex", h.TrainSettings(preset="quick", steps=16, class_images=2))
    run, stored = app.workspace.run(ref), tmp_path / "store" / "rex" / "runs" / ref.split("/")[1]
    assert run.is_relative_to(tmp_path / "mirror") and (stored / "ui-request.json").is_file()
    seen, deadline = [], time.monotonic() + 600
    while (status := h.run_status(app, ref)).active and time.monotonic() < deadline:
        seen.append(status)
        time.sleep(0.2)
    assert status.finished and status.step == 16, status.message
    training = [s for s in seen if s.state == runs.TRAINING and s.step > 0]
    assert training and any(s.samples for s in training)                       # progress and previews, live
    for s in training + [status]:                                              # each preview already here
        assert all(Path(p).is_file() and Path(p).is_relative_to(run) for _, paths in s.samples for p in paths)
    job = app.worker.queue.wait([app.worker.job_id(run)], timeout=60)[0]
    assert job.state == "done" and job.config["out"] == f"{url}/{ref.replace('/', '/runs/')}"
    assert job.config["images"].startswith(f"{url}/inputs/")                   # the photos went up at submit
    assert (stored / "adapter.safetensors").is_file() and (stored / "samples").is_dir()
    assert json.loads((run / "config.json").read_text())["config"]["out"] == str(run)   # pointed at the mirror

    made = h.generate_images(app, ref, "a photo of sks dog", n=1, steps=2)
    assert made.images and all(p.is_file() and p.is_relative_to(run) for p in made.images)
    app.sessions.release()                                                     # (ctx closes the cluster)

    restarted = h.make_context(url, tiny_model, cluster="local", mirror=tmp_path / "empty-mirror")
    assert [r for _, r in h.list_runs(restarted)] == [ref]
    assert h.run_status(restarted, ref).finished


def test_run_stream_keeps_each_event_once():
    """A run's file history, then the keeper's stream: the file lags (step 3 is not in it yet) and
    the keeper still holds events the file has (after an app restart); each is kept once."""
    step = {"type": "step", "total": 3, "loss": 0.5, "it_s": 2.0, "eta_s": 1.0}
    device = {"type": "device", "time": 100.0}
    start = {"type": "start", "time": 100.1, "step": 0, "total": 3}
    s1, s2, s3 = ({**step, "time": 100.1 + i / 10, "step": i} for i in (1, 2, 3))
    sample = {"type": "sample", "time": 100.25, "step": 2, "paths": ["/w/runs/r/samples/step-2/00.png"]}
    retry = {"type": "retry", "time": 100.05, "attempt": 2, "message": "attempt 2 of 3: its worker died"}
    history = json.loads(json.dumps([device, retry, start, s1, s2, sample]))           # as the file has them
    streamed = [(7, start), (9, s2), (10, {**sample, "paths": [Path(sample["paths"][0])]}),   # the trainer's dicts
                (11, {**retry, "time": 100.02}), (12, s3), (13, {"type": "job", "time": 100.5, "state": "done"})]

    stream = RunStream(history)
    stream.add(streamed)
    assert stream.since == 13
    assert [(e["type"], e.get("step")) for e in stream.events] == [
        ("device", None), ("retry", None), ("start", 0), ("step", 1), ("step", 2), ("sample", 2),
        ("retry", None), ("step", 3), ("job", None)]
    stream.add([(12, s3)])                                     # a repeat changes nothing
    assert len(stream.events) == 9
    status = runs.read_status(Path("/w/runs/r"), events=stream.events)
    assert (status.step, status.losses, len(status.samples)) == (3, [(1, 0.5), (2, 0.5), (3, 0.5)], 1)
    assert status.warnings == [retry["message"]]

    alone = RunStream([])                                      # the app's machine sees no file: the stream alone
    alone.add(streamed)
    assert [e["type"] for e in alone.events] == ["start", "step", "sample", "retry", "step", "job"]
    lost = {"type": "job", "time": 101.0, "state": "failed", "message": "its worker died 3 time(s), more than the 2 "
                                                                       "retries allowed (WorkerCrashedError)"}
    alone.add([(14, lost)])                                    # the keeper gave up: no trainer wrote an error
    status = runs.read_status(Path("/w/runs/r"), events=alone.events)
    assert status.state == runs.FAILED and "worker died 3 time(s)" in status.message


def test_runs_of_two_subjects_are_two_jobs():
    """Every subject's first run is ``001-…``: the job ids name the subject (and the user) too."""
    root = Path("/w")
    ids = [job_id(root / p, root) for p in ("rex/runs/001-dora-quick", "max/runs/001-dora-quick",
                                            "users/ann/rex/runs/001-dora-quick", "users/bob/rex/runs/001-dora-quick")]
    assert ids == ["rex-001-dora-quick", "max-001-dora-quick", "users-ann-rex-001-dora-quick",
                   "users-bob-rex-001-dora-quick"]
