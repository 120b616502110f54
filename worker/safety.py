"""Running a model's own safety checker on finished images, where the model ships one.

The checker is the pipeline's `safety_checker` component (for SD 1.x/2.x, diffusers'
StableDiffusionSafetyChecker, fed by its `feature_extractor`). It is called here rather than inside the
pipeline so that only its verdicts are used: what to do with a flagged image is the tenant's choice
(request["nsfw"]: "withhold" fails the job with code content_policy, "flag" returns it marked `nsfw`).

A batch's images are checked together, as they were generated: one checker call per job was a
launch-bound pass of the checker's CLIP at a few images each, between two batches, with the accelerator
otherwise idle. Each image's verdict is its own whatever shares the call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

Verdicts = list[bool] | Exception  # a job's images' flags, or what failed its check


def nsfw_flags_by_job(pipe: Any, images: dict[str, list[Image.Image]]) -> dict[str, Verdicts]:
    """`nsfw_flags` for each job of a batch (job id -> its images), in one checker call. If that call fails,
    the jobs are checked one by one, so that a failure is only the job's whose images cause it."""
    jobs = [job_id for job_id, made in images.items() if made]
    verdicts: dict[str, Verdicts] = {job_id: [] for job_id, made in images.items() if not made}
    if len(jobs) > 1:
        try:
            flags = iter(nsfw_flags(pipe, [image for job_id in jobs for image in images[job_id]]))
        except Exception:
            pass  # one by one, below
        else:
            return verdicts | {job_id: [next(flags) for _ in images[job_id]] for job_id in jobs}
    for job_id in jobs:
        try:
            verdicts[job_id] = nsfw_flags(pipe, images[job_id])
        except Exception as exc:
            verdicts[job_id] = exc
    return verdicts


def nsfw_flags(pipe: Any, images: list[Image.Image]) -> list[bool]:
    """One verdict per image; all False where the model has no checker."""
    checker = pipe.components.get("safety_checker")
    if checker is None:
        return [False] * len(images)
    extractor = pipe.components.get("feature_extractor")
    clip_input = None
    if extractor is not None:
        param = next(checker.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        clip_input = extractor(images, return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
    # A copy: the stock checker blacks out flagged images in the array it is given.
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    with torch.inference_mode():
        _, flags = checker(images=array.copy(), clip_input=clip_input)
    return [bool(flag) for flag in flags]
