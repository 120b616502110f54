"""darkroom's HTTP API. It never imports torch or the worker: jobs are sent to Celery by task name."""
