"""The `jobs.run` task as Celery's main process sees it: a name and retry options, no pipeline code.

The main process forks the pool process that runs jobs. If the main process had touched CUDA, even only to
count devices (torch and libraries it imports do so on import), every forked pool process would fail its
first CUDA call with "Cannot re-initialize CUDA in forked subprocess". So the main process never imports
torch: `worker.tasks` (torch, diffusers) is imported in the pool process, when it starts (worker/app.py).
"""

from __future__ import annotations

from celery import Celery
from sqlalchemy.exc import OperationalError

from shared.broker import TASK_RUN_JOB


def run_job(job_id: str) -> str:
    from worker import tasks

    return tasks.run_job(job_id)


def register(app: Celery) -> None:
    # A database outage while claiming or recording must not eat the token: the retry publishes it again.
    app.task(
        name=TASK_RUN_JOB,
        ignore_result=True,
        autoretry_for=(OperationalError,),
        retry_backoff=True,
        retry_backoff_max=30,
        max_retries=None,
    )(run_job)
