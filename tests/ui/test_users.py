"""A shared deployment (issue 15, "Isolation"): with logins, each user has a workspace of their
own under WORKSPACE/users/<user> and sees and touches only their own subjects, photos and runs,
with per-user limits on runs queued and on disk. Handlers with a stand-in trainer first, then a
live ``dorabooth-ui --auth-file`` with two logins through gradio's own client."""

import json

import pytest
from ui_fixtures import FakeTrainer, call_event, make_photos, serve_app, upload_files, wait_for_run

from ui import handlers as h
from ui.users import Limits, check_logins, user_folder_name, used_bytes
from ui.workspace import UserError


@pytest.fixture
def shared(tmp_path, tiny_model):
    """The app's context with separate users, alice's and bob's, and alice's subject "rex"."""
    trainer = FakeTrainer()
    app = h.make_context(tmp_path / "ws", tiny_model, train=trainer, separate_users=True,
                         limits=Limits(max_queued=2))
    alice, bob = app.for_user("alice"), app.for_user("bob")
    h.upload_photos(alice, "rex", make_photos(tmp_path / "up"), "sks", "dog")
    yield app, alice, bob, trainer
    trainer.release.set()
    app.close()


SETTINGS = h.TrainSettings(steps=2, prior_preservation=False)


def test_each_user_sees_and_touches_only_their_own_subjects_and_runs(shared, tmp_path):
    app, alice, bob, trainer = shared
    assert alice.workspace.root == app.workspace.root / "users" / "alice"
    assert (alice.workspace.root / "rex" / "images").is_dir() and not (app.workspace.root / "rex").exists()
    assert h.subject_names(alice) == ["rex"] and h.subject_names(bob) == []
    with pytest.raises(UserError, match="no subject called 'rex'"):
        h.open_subject(bob, "rex")
    ref = h.start_training(alice, "rex", SETTINGS)
    assert h.live_run(alice) == ref and h.live_run(bob) is None          # the shared line, each their own view
    assert h.list_runs(bob) == [] and [r for _, r in h.list_runs(alice)] == [ref]
    for act in (lambda: h.run_status(bob, ref), lambda: h.stop_training(bob, ref),
                lambda: h.resume_training(bob, ref), lambda: h.delete_run(bob, ref),
                lambda: h.rename_run(bob, ref, "mine"), lambda: h.generate_images(bob, ref, "a sks dog")):
        with pytest.raises(UserError, match="no run called"):
            act()
    assert h.run_status(alice, ref).active                              # bob's attempts did not stop it
    # bob's own "rex" is another subject in another folder; his run waits behind alice's
    h.upload_photos(bob, "rex", make_photos(tmp_path / "bob", seed=5), "zwx", "dog")
    bobs = h.start_training(bob, "rex", SETTINGS)
    assert bob.worker.position(bob.workspace.run(bobs)) == 1
    assert h.subject_names(alice) == ["rex"] and h.open_subject(alice, "rex").token == "sks"
    trainer.release.set()
    assert wait_for_run(alice, ref).finished and wait_for_run(bob, bobs).finished
    assert app.for_user("alice") is alice                             # one context per user, reused
    with pytest.raises(UserError, match="log in first"):
        app.for_user(None)


def test_runs_queued_are_limited_per_user(shared, tmp_path):
    app, alice, bob, trainer = shared
    refs = [h.start_training(alice, "rex", h.TrainSettings(steps=2, seed=s, prior_preservation=False))
            for s in (1, 2)]
    with pytest.raises(UserError, match="2 runs of yours are training or waiting already"):
        h.start_training(alice, "rex", h.TrainSettings(steps=2, seed=3, prior_preservation=False))
    h.upload_photos(bob, "tom", make_photos(tmp_path / "bob"), "sks", "cat")
    other = h.start_training(bob, "tom", SETTINGS)                       # bob's own limit is untouched
    assert h.run_status(bob, other).state == "queued"
    h.stop_training(alice, refs[1])                                      # a waiting one leaves the line: room
    h.start_training(alice, "rex", h.TrainSettings(steps=2, seed=3, prior_preservation=False))
    with pytest.raises(UserError, match="2 runs of yours"):               # and resuming counts too
        h.resume_training(alice, refs[1])
    trainer.release.set()
    assert wait_for_run(alice, refs[0]).finished


def test_a_disk_quota_refuses_uploads_and_runs_and_says_what_to_delete(tmp_path, tiny_model):
    trainer = FakeTrainer()
    trainer.release.set()
    app = h.make_context(tmp_path / "ws", tiny_model, train=trainer, separate_users=True)
    try:
        carol = app.for_user("carol")
        h.upload_photos(carol, "mug", make_photos(tmp_path / "small", n=3, size=64), "sks", "mug")
        held = used_bytes(carol.workspace.root)
        big = make_photos(tmp_path / "big", n=3, size=256, seed=3)
        quota = held + sum(p.stat().st_size for p in big) // 2
        carol.limits = Limits(disk_bytes=quota)                             # as --disk-quota gives every user
        with pytest.raises(UserError, match=r"your workspace holds .* of its .* quota and this upload needs"):
            h.upload_photos(carol, "mug", big, "sks", "mug")
        assert used_bytes(carol.workspace.root) == held                      # nothing of the refused upload kept
        ref = h.start_training(carol, "mug", SETTINGS)
        assert wait_for_run(carol, ref).finished
        (carol.workspace.run(ref) / "generated").mkdir()
        (carol.workspace.run(ref) / "generated" / "big.bin").write_bytes(b"\0" * quota)    # now over its quota
        for act in (lambda: h.start_training(carol, "mug", h.TrainSettings(steps=2, seed=9, prior_preservation=False)),
                    lambda: h.generate_images(carol, ref, "a sks mug"),
                    lambda: h.export_run(carol, ref, "kohya")):
            with pytest.raises(UserError, match="delete runs you no longer need"):
                act()
        assert [r for _, r in h.list_runs(carol)] == [ref]                  # no folder for the refused run
        h.delete_run(carol, ref)                                             # deleting makes room again
        assert wait_for_run(carol, h.start_training(carol, "mug", SETTINGS)).finished
    finally:
        app.close()


def test_logins_map_to_distinct_folders():
    assert user_folder_name("alice") == "alice" and user_folder_name("bob smith") == "bob_smith"
    assert user_folder_name("../../etc") == ".._.._etc"
    with pytest.raises(ValueError, match="would share the folder users/bob_smith"):
        check_logins([("bob smith", "x"), ("bob_smith", "y")])
    with pytest.raises(ValueError, match="use a user name with a letter or digit"):
        user_folder_name("..")


def test_waiting_runs_of_every_user_are_queued_again_after_a_restart(shared, tmp_path, tiny_model):
    app, alice, bob, trainer = shared
    h.upload_photos(bob, "tom", make_photos(tmp_path / "bob"), "sks", "cat")
    first = h.start_training(alice, "rex", SETTINGS)
    waiting = [h.start_training(alice, "rex", h.TrainSettings(steps=2, seed=7, prior_preservation=False)),
               h.start_training(bob, "tom", SETTINGS)]
    app.worker.close(timeout=5)                                           # the app stops; two runs never started
    restarted = h.make_context(tmp_path / "ws", tiny_model, train=trainer, separate_users=True)
    try:
        found = h.recover_queue(restarted)
        assert sorted(found) == sorted([f"alice: {waiting[0]}", f"bob: {waiting[1]}"])
        assert first not in " ".join(found)                               # it had started: resume is the user's call
        trainer.release.set()
        assert wait_for_run(restarted.for_user("bob"), waiting[1]).finished
    finally:
        restarted.close()


# ---- a live app with two logins -------------------------------------------------------------------
gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")
ALICE, BOB = ("alice", "alice's long password"), ("bob", "bob's long password")


def test_two_logins_on_a_live_app_see_only_their_own(tmp_path):
    logins = tmp_path / "logins"
    logins.write_text(f"{':'.join(ALICE)}\n{':'.join(BOB)}\n")
    with serve_app(tmp_path, "toy", "--auth-file", str(logins)) as (url, workspace):
        alice = gradio_client.Client(url, auth=ALICE, verbose=False)
        bob = gradio_client.Client(url, auth=BOB, verbose=False)
        kind, out = call_event(alice, "/on_upload", ["rex", upload_files(alice, make_photos(tmp_path / "a", n=3)), "sks", "dog"])
        assert kind == "complete" and "Added 3 photos" in out[3]
        photo = workspace / "users" / "alice" / "rex" / "images" / "photo-0.png"
        assert photo.is_file() and not (workspace / "rex").exists()
        kind, out = call_event(bob, "/on_subject", ["rex"])                     # bob's page knows no "rex"
        assert kind == "complete" and out[4] == [] and "3 photo" not in out[3]
        # the workspace's files: each user's only to them (gradio alone serves allowed_paths to any login)
        mine = httpx.get(url + f"gradio_api/file={photo}", cookies=alice.cookies, timeout=30)
        theirs = httpx.get(url + f"gradio_api/file={photo}", cookies=bob.cookies, timeout=30)
        assert mine.status_code == 200 and mine.content == photo.read_bytes()
        assert theirs.status_code == 403
        kind, out = call_event(bob, "/on_upload", ["rex", upload_files(bob, make_photos(tmp_path / "b", n=3, seed=9)), "zwx",
                                              "dog"])
        assert kind == "complete" and (workspace / "users" / "bob" / "rex" / "images").is_dir()
        assert json.loads((workspace / "users" / "alice" / "rex" / "subject.json").read_text())["token"] == "sks"
