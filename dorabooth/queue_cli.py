"""``dorabooth queue submit|list|cancel|resume|logs|wait``: many trainings on a Ray cluster.

    dorabooth queue submit --workspace /shared/ws [--cluster auto] -- --images photos/ --class-noun dog
    dorabooth queue list --workspace /shared/ws
    dorabooth queue logs JOB --workspace /shared/ws --follow
    dorabooth queue cancel JOB …   /   dorabooth queue resume JOB …   /   dorabooth queue wait JOB … [--timeout S]

Everything after ``--`` in ``submit`` is what ``dorabooth train`` takes (``--out`` defaults to
``WORKSPACE/runs/<job id>``). The workspace is a folder every worker of the cluster reaches at
the same path, or an object store (``s3://bucket/ws``, ``gs://…``: any fsspec URL), where the
photos are uploaded at submit and each worker trains in a scratch folder mirrored into
``WORKSPACE/runs/<job id>`` (``queue.remote``; docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time

DEFAULT_CLUSTER = os.environ.get("DORABOOTH_CLUSTER", "auto")


def _add_queue(sub) -> None:
    p = sub.add_parser("queue", help="many trainings on a Ray cluster: submit, list, cancel, resume, logs, wait",
                       description=__doc__.split("\n\n")[0])
    q = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(sp):
        sp.add_argument("--workspace", default="dorabooth-workspace", metavar="DIR|URL",
                        help="the queue's folder, the same path on every worker, or an object store URL such as "
                             "s3://bucket/ws (needs s3fs / gcsfs on every machine) (default ./dorabooth-workspace)")
        sp.add_argument("--cluster", default=DEFAULT_CLUSTER, metavar="ADDR",
                        help="auto (a cluster started on this machine with `ray start --head`), ray://HOST:PORT, "
                             "HOST:PORT, or local (start one in this process; it ends with it). Default: "
                             "$DORABOOTH_CLUSTER or auto")
        sp.add_argument("--user", default=None, help="whose jobs (default: this login's name)")
        sp.add_argument("--json", action="store_true", help="print JSON")
        sp.set_defaults(handler=_run)

    s = q.add_parser("submit", help="queue a training; the flags after -- are `dorabooth train`'s")
    common(s)
    s.add_argument("--id", dest="job_id", default=None, help="job id (default: token-noun-time-random)")
    s.add_argument("--cpus", type=float, default=1.0, help="CPUs each attempt asks for when it has no GPU (default 1)")
    s.add_argument("--gpus", type=float, default=None, help="GPUs each attempt asks for (default: 1 when the "
                                                             "cluster has GPUs, else 0)")
    s.add_argument("--retries", type=int, default=2, help="attempts more when a worker dies (default 2)")
    s.add_argument("--max-queued", dest="max_queued", type=int, default=None,
                   help="refuse when this user has this many jobs waiting or training")
    s.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `dorabooth train` flags")
    common(q.add_parser("list", help="the jobs, their state and progress"))
    for name, what in (("cancel", "stop a job after its current step, with a checkpoint (or before it starts)"),
                       ("resume", "queue a cancelled or failed job again; it continues from its checkpoint")):
        sp = q.add_parser(name, help=what)
        common(sp)
        sp.add_argument("job")
    lg = q.add_parser("logs", help="a job's events (--follow: as the workers send them, until it ends)")
    common(lg)
    lg.add_argument("job")
    lg.add_argument("--follow", action="store_true")
    w = q.add_parser("wait", help="until the jobs end; exit 1 if one did not finish")
    common(w)
    w.add_argument("jobs", nargs="+")
    w.add_argument("--timeout", type=float, default=None, help="seconds (default: no limit)")


def _run(args) -> int:
    from .queue import FINAL
    from .queue.ray_queue import RayQueue
    from .queue.store import current_user

    user = args.user or current_user()
    queue = RayQueue(args.workspace, args.cluster, user=user, max_queued=getattr(args, "max_queued", None))
    if args.action == "submit":
        job = queue.submit(_train_config(args, queue.store), job_id=args.job_id, retries=args.retries,
                           cpus=args.cpus, gpus=args.gpus)
        print(json.dumps(job.to_dict()) if args.json else f"{job.id} queued (run folder {job.run})")
        return 0
    if args.action == "list":
        jobs, progress = queue.jobs(), queue.progress()
        if args.json:
            print(json.dumps([{**j.to_dict(), "progress": progress.get(j.id)} for j in jobs]))
            return 0
        for j in jobs:
            p = progress.get(j.id) or {"step": j.step, "total": j.total}
            step = f"{p.get('step', 0)}/{p.get('total') or '?'}"
            tries = f"attempt {len(j.attempts)}" if len(j.attempts) > 1 else ""
            print("  ".join(x for x in (j.id, j.owner, j.state, step, tries, j.message) if x))
        return 0
    if args.action == "cancel":
        job = queue.cancel(args.job)
        print(f"{job.id}: {job.state}" + ("" if job.state in FINAL else ", stopping after its current step"))
        return 0
    if args.action == "resume":
        job = queue.resume(args.job)
        print(f"{job.id}: {job.state}")
        return 0
    if args.action == "logs":
        if args.follow:
            events = queue.follow(args.job)
        else:
            events = _logged_events(queue.get(args.job).run)
        for e in events:
            print(json.dumps(e) if args.json else _line(e), flush=True)
        return 0
    jobs = queue.wait(args.jobs, timeout=args.timeout)
    for j in jobs:
        print(json.dumps(j.to_dict()) if args.json else f"{j.id}: {j.state}{' — ' + j.message if j.message else ''}")
    return 0 if all(j.state == "done" for j in jobs) else 1


def _train_config(args, store) -> dict:
    """The TrainConfig fields of the flags after ``--`` (as ``dorabooth train`` reads them), with
    ``--out`` defaulting to the job's folder under the workspace."""
    from .cli import build_parser, train_config_from_args

    rest = list(args.train_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not rest:
        raise ValueError("give the training after --, e.g. dorabooth queue submit -- --images photos/ "
                         "--class-noun dog")
    train_args = build_parser().parse_args(["train", *rest])
    if not getattr(train_args, "out", None):
        probe = {k: getattr(train_args, k, None) for k in ("token", "class_noun")}
        args.job_id = args.job_id or store.new_id(probe)
        train_args.out = f"{store.runs}/{args.job_id}" if store.remote else str(store.runs / args.job_id)
    config = train_config_from_args(train_args)
    from .preflight import check_request
    check_request(config)                       # a wrong photo folder is said here, not on a worker later
    return config.to_dict()


def _logged_events(run) -> list[dict]:
    """The events a run folder holds (a folder, or a run in an object-store workspace)."""
    from .events import parse_events, read_events
    from .rundir import EVENTS

    if isinstance(run, str):
        from .queue.remote import read_text
        return parse_events((read_text(f"{run}/{EVENTS}") or "").splitlines(keepends=True))
    return read_events(run / EVENTS)


def _line(e: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e.get("time", 0)))
    rest = {k: v for k, v in e.items() if k not in ("type", "time")}
    return f"{when} {e.get('type')}: " + ", ".join(f"{k}={v}" for k, v in rest.items())


COMMANDS = {"queue": _add_queue}
