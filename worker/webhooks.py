"""The `webhooks.deliver` task, on its own `webhooks` queue: one signed POST per message (shared.webhooks)."""

from __future__ import annotations

from celery import Celery

from shared import webhooks


def deliver(delivery_id: str) -> str:
    return webhooks.deliver(delivery_id)


def register(app: Celery) -> None:
    # No time limits of the GPU job's size: one attempt is bounded by DARKROOM_WEBHOOK_TIMEOUT.
    app.task(name=webhooks.TASK_DELIVER, ignore_result=True, acks_late=True)(deliver)
