"""Running many runs: a queue whose state is a workspace folder every worker reaches
(``store``), one attempt at a job (``attempt``), and the queue on a Ray cluster (``ray_queue``,
needs ``dorabooth[cluster]``). ``dorabooth queue …`` is its command line (``queue_cli``)."""

from .store import FINAL, STATES, Job, JobStore, NotYours, QuotaExceeded

__all__ = ["FINAL", "STATES", "Job", "JobStore", "NotYours", "QuotaExceeded"]
