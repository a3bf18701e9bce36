"""The queue: records in a workspace folder, one attempt at a job, and the jobs on a real local
Ray cluster (2 CPUs, loopback): two trainings at once, a killed worker retried from the last
checkpoint (same adapter as an uninterrupted run), cancel and resume, two users kept apart,
a restarted keeper picking the queue up again, and the command line."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dorabooth.cli import main as cli
from dorabooth.events import read_events
from dorabooth.queue import JobStore, NotYours, QuotaExceeded
from dorabooth.queue.attempt import run_attempt
from tiny_runs import make_subject, quick, save_model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("queue")


@pytest.fixture(scope="module")
def base(root):
    """Photos, a tiny SD 1.5 model and its class images, shared by every job here."""
    return {"images": str(make_subject(root / "subject")), "model": str(save_model("sd15", root / "model")),
            "class_images": str(root / "class")}


def config(base, **kw) -> dict:
    return {**base, **quick(**kw)}


# ---- records and one attempt, in this process ------------------------------------------------
def test_records_ids_owners_and_quota(tmp_path):
    store = JobStore(tmp_path / "ws")
    job = store.add({"token": "sks", "class_noun": "dog"}, "alice")
    assert job.id.startswith("sks-dog-") and job.state == "queued" and job.run == store.runs / job.id
    assert store.get(job.id) == job and [j.id for j in store.jobs("alice")] == [job.id] and store.jobs("bob") == []
    with pytest.raises(QuotaExceeded, match="alice has 1 job.*most this queue allows \\(1\\)"):
        store.add({"class_noun": "cat"}, "alice", max_queued=1)
    store.add({"class_noun": "cat"}, "bob", max_queued=1)                   # the quota is per user
    with pytest.raises(FileExistsError, match=f"run folder of job {job.id}"):
        store.add({"class_noun": "dog", "out": str(job.run)}, "bob")
    with pytest.raises(NotYours):
        store.owned(job.id, "bob")
    with pytest.raises(FileNotFoundError, match="no job nope in .*dorabooth queue list"):
        store.get("nope")
    with pytest.raises(ValueError, match="not a job id"):
        store.get("../etc/passwd")
    store.request_cancel(job.id)
    assert store.cancel_requested(job.id)
    store.clear_cancel(job.id)
    assert not store.cancel_requested(job.id)


def test_an_attempt_trains_cancels_and_fails_in_this_process(base, tmp_path):
    store = JobStore(tmp_path / "ws")
    events = []
    done = store.add(config(base), "alice", job_id="ok")
    record = run_attempt(store.root, "ok", report=lambda job, e: events.append((job, e["type"])))
    assert record["state"] == "done" and Path(record["result"]).is_file() and record["attempts"][0]["pid"] == os.getpid()
    assert ("ok", "start") in events and events[-1] == ("ok", "job")
    assert run_attempt(store.root, "ok")["attempts"] == record["attempts"]     # a finished job is not trained again
    assert store.get(done.id).step == 2
    store.add(config(base), "alice", job_id="early")
    store.request_cancel("early")
    assert run_attempt(store.root, "early")["state"] == "cancelled"
    assert not (store.runs / "early").exists()
    store.add(config(base, images=str(tmp_path / "missing")), "alice", job_id="bad")
    bad = run_attempt(store.root, "bad")
    assert bad["state"] == "failed" and "missing" in bad["message"]


# ---- a workspace on an object store (fsspec), in this process -----------------------------------
def _objects(url: str) -> tuple:
    from dorabooth.queue.remote import filesystem

    return filesystem(url)


def _adapter(url: str) -> dict:
    from safetensors.torch import load

    fs, path = _objects(url)
    return load(fs.cat_file(path))


def test_an_object_store_workspace_trains_elsewhere_and_resumes_on_another_machine(base, tmp_path, monkeypatch):
    """``memory://`` stands for s3:// or gs://: no path of it is a local file. Each attempt trains in
    its machine's scratch folder and mirrors the run into WORKSPACE/runs/<job>; a cancelled job
    resumes on another machine (an empty scratch) from the mirrored checkpoints, skipping one
    whose upload was cut short, and ends with the adapter of an uninterrupted job."""
    url = f"memory://ws-{os.getpid()}-{time.time_ns()}"
    store = JobStore(url)
    recipe = {k: v for k, v in config(base, steps=8, checkpoint_every=1, keep_checkpoints=10).items()
              if k != "class_images"}
    with pytest.raises(ValueError, match="leave --class-images out"):
        store.add(config(base), "alice")
    store.add(recipe, "alice", job_id="straight")
    job = store.add(recipe, "alice", job_id="moved")
    assert job.run == f"{url}/runs/moved" and job.config["images"] == f"{url}/inputs/moved/images"
    monkeypatch.setenv("DORABOOTH_SCRATCH", str(tmp_path / "machine-a"))
    assert run_attempt(url, "straight")["state"] == "done"

    def cancel_at_3(job_id, event):
        if event["type"] == "checkpoint" and event["step"] == 3:
            store.request_cancel(job_id)
            time.sleep(1.5)                            # the attempt sees it (every 0.5 s): stops after step 4
    first = run_attempt(url, "moved", report=cancel_at_3)
    assert first["state"] == "cancelled" and first["step"] == 4
    fs, root = _objects(url)
    mirrored = {p.split("/runs/moved/", 1)[1] for p in fs.find(f"{root}/runs/moved")}
    assert {"config.json", "events.jsonl", "checkpoints/step-4/state.json", "checkpoints/step-3/state.json"} <= mirrored
    assert not any(".tmp" in p or p.endswith(".lock") for p in mirrored)
    fs.rm_file(f"{root}/runs/moved/checkpoints/step-4/state.json")       # as if its upload had been cut short

    monkeypatch.setenv("DORABOOTH_SCRATCH", str(tmp_path / "machine-b"))  # another machine: nothing local
    store.clear_cancel("moved")
    record = store.get("moved")
    record.state = "queued"
    store.save(record)
    second = run_attempt(url, "moved")
    assert second["state"] == "done", second["message"]
    assert second["result"] == f"{url}/runs/moved/adapter.safetensors"
    events = [json.loads(line) for line in fs.cat_file(f"{root}/runs/moved/events.jsonl").decode().splitlines()]
    assert [e["step"] for e in events if e["type"] == "resume"] == [3]   # not 4: its checkpoint was incomplete
    straight, moved = _adapter(f"{url}/runs/straight/adapter.safetensors"), _adapter(second["result"])
    assert straight.keys() == moved.keys()
    assert max((straight[k] - moved[k]).abs().max().item() for k in straight) <= 1e-6


# ---- on a local Ray cluster -----------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(root):
    ray = pytest.importorskip("ray")
    from dorabooth.queue.ray_queue import RayQueue

    RayQueue(root / "ws", "local", user="alice", num_cpus=2)               # starts the cluster (~5 s)
    yield root / "ws"
    ray.shutdown()


def queue_for(cluster, user="alice", **kw):
    from dorabooth.queue.ray_queue import RayQueue

    return RayQueue(cluster, "local", user=user, **kw)


def _wait_for(what, timeout=600.0, poll=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = what()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError("waited too long")


def test_two_jobs_train_at_once_and_a_killed_worker_is_retried_from_its_checkpoint(cluster, base):
    q = queue_for(cluster)
    recipe = config(base, steps=40, checkpoint_every=2, keep_checkpoints=40)
    q.submit(recipe, job_id="straight", gpus=0)
    killed = q.submit(recipe, job_id="killed", gpus=0)
    _wait_for(lambda: (killed.run / "checkpoints" / "step-4").is_dir())
    pid = q.get("killed").attempts[-1]["pid"]
    os.kill(pid, signal.SIGKILL)                                             # the worker dies mid-run
    a, b = q.wait(["straight", "killed"], timeout=600)
    assert (a.state, b.state) == ("done", "done"), (a.message, b.message)
    assert len(a.attempts) == 1 and len(b.attempts) == 2
    assert b.attempts[0]["outcome"] == "its worker died" and b.attempts[1]["pid"] != pid
    assert a.attempts[0]["started"] < b.attempts[0]["ended"] and b.attempts[0]["started"] < a.attempts[0]["ended"]
    resumed = [e for e in read_events(b.run / "events.jsonl") if e["type"] == "resume"]
    assert resumed and resumed[0]["step"] >= 4                              # continued, not started over
    from ui.runs import read_status                                          # and the app's page says why
    assert "attempt 2 of 3: its worker died, continuing from the last checkpoint" in read_status(b.run).warnings
    x, y = load_file(a.result), load_file(b.result)
    assert x.keys() == y.keys()
    assert max((x[k] - y[k]).abs().max().item() for k in x) <= 1e-6


def test_cancel_stops_after_a_step_with_a_checkpoint_and_resume_finishes(cluster, base):
    q = queue_for(cluster)
    job = q.submit(config(base, steps=60, checkpoint_every=100), job_id="cancelled", gpus=0)
    _wait_for(lambda: q.progress().get(job.id, {}).get("step", 0) >= 2)      # progress streamed from the worker
    q.cancel(job.id)
    (job,) = q.wait([job.id], timeout=600)
    assert job.state == "cancelled" and "with a checkpoint" in job.message
    step = int(job.message.split("after step ")[1].split()[0])
    assert 2 <= step < 60 and (job.run / "checkpoints" / f"step-{step}").is_dir()
    q.resume(job.id)
    (job,) = q.wait([job.id], timeout=600)
    assert job.state == "done" and job.step == 60 and len(job.attempts) == 2


def test_users_see_and_touch_only_their_own_jobs(cluster, base):
    alice, bob = queue_for(cluster, "alice", max_queued=1), queue_for(cluster, "bob")
    mine = alice.submit(config(base), job_id="alices", gpus=0)
    with pytest.raises(QuotaExceeded):
        alice.submit(config(base), gpus=0)
    assert "alices" not in [j.id for j in bob.jobs()] and "alices" not in bob.progress()
    for touch in (bob.get, bob.cancel, bob.resume):
        with pytest.raises(NotYours):
            touch(mine.id)
    with pytest.raises(NotYours):
        list(bob.follow(mine.id))
    assert alice.wait([mine.id], timeout=600)[0].state == "done"


def test_a_new_keeper_picks_up_the_queue_from_the_workspace(cluster, base):
    """The keeper holds nothing the workspace does not: after it is gone (the cluster restarted),
    a job left queued in the records is submitted again and trains."""
    import ray

    from dorabooth.queue.ray_queue import keeper

    ray.kill(keeper(cluster))
    JobStore(cluster).add(config(base), "alice", job_id="left-queued")
    q = _wait_for(lambda: _fresh_queue(cluster), timeout=60, poll=0.5)
    assert q.wait(["left-queued"], timeout=600)[0].state == "done"


def _fresh_queue(cluster):
    try:
        return queue_for(cluster)
    except Exception:                                  # the killed actor's name is not free yet
        return None


def test_the_command_line(cluster, base, capsys):
    flags = ["--workspace", str(cluster), "--cluster", "local", "--user", "carol"]
    train = ["--images", base["images"], "--model", base["model"], "--class-images", base["class_images"],
             "--class-noun", "dog", "--steps", "2", "--rank", "4", "--targets", "attn", "--num-class-images", "2",
             "--class-image-steps", "2", "--sample-every", "0", "--no-train-text-encoders"]
    assert cli(["queue", "submit", *flags, "--id", "cli", "--gpus", "0", "--", *train]) == 0
    assert "cli queued (run folder" in capsys.readouterr().out
    assert cli(["queue", "wait", *flags, "cli", "--timeout", "600"]) == 0
    assert "cli: done" in capsys.readouterr().out
    assert cli(["queue", "list", *flags]) == 0
    assert capsys.readouterr().out.startswith("cli  carol  done  2/2")
    assert cli(["queue", "logs", *flags, "cli"]) == 0
    assert " done: adapter=" in capsys.readouterr().out
    assert cli(["queue", "cancel", *flags, "cli"]) == 0 and "cli: done" in capsys.readouterr().out
    assert cli(["queue", "submit", *flags, "--", "--images", "nowhere", "--class-noun", "dog"]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_the_command_line_with_a_workspace_url(cluster, base, capsys, tmp_path):
    """``--workspace file:///…`` goes through fsspec like s3://: the photos are uploaded at submit,
    a worker trains in its scratch folder and mirrors the run; logs read it from the workspace."""
    url = f"file://{tmp_path}/objects"
    flags = ["--workspace", url, "--cluster", "local", "--user", "carol"]
    train = ["--images", base["images"], "--model", base["model"], "--class-noun", "dog", "--steps", "2",
             "--rank", "4", "--targets", "attn", "--num-class-images", "2", "--class-image-steps", "2",
             "--sample-every", "0", "--no-train-text-encoders"]
    assert cli(["queue", "submit", *flags, "--id", "far", "--gpus", "0", "--", *train]) == 0
    assert f"far queued (run folder {url}/runs/far)" in capsys.readouterr().out
    assert cli(["queue", "wait", *flags, "far", "--timeout", "600"]) == 0, capsys.readouterr()
    assert (tmp_path / "objects" / "runs" / "far" / "adapter.safetensors").is_file()
    assert (tmp_path / "objects" / "inputs" / "far" / "images").is_dir()
    assert cli(["queue", "logs", *flags, "far"]) == 0
    assert " done: adapter=" in capsys.readouterr().out
