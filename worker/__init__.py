"""darkroom's GPU worker: Celery tasks that run diffusers pipelines and upload the images."""
