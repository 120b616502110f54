"""Pipeline calls: one or several compatible requests as one call, with a per-step hook for progress and cancel.

Nothing here touches the database or Redis; the benchmark's "direct" figure runs exactly this code.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from worker.acceleration import configure_vae, uses_cfg
from worker.inputs import effective_steps, pipe_kwargs_for
from worker.preview import Factors, factors_for
from worker.upscale import fit, is_upscaler


class StopGeneration(Exception):
    """Raised from the step hook to abandon a call mid-denoising (every job in it canceled or taken over).

    Raising is the one way to stop diffusers without also decoding an image (`_interrupt` still decodes).
    """


# How far the host may run ahead of a CUDA device, in denoising steps. With CUDA graphs a step's launches
# take the host well under a millisecond against tens of milliseconds on the device, and nothing in a
# step waits for the device: unpaced, the host queues every step of a call at its start, then waits in the
# decode, and the step hook (progress, previews, cancels, the next batch's claim at the last step) runs a
# whole call early (diffusers#3950: a progress bar at 100% long before the images). Two steps queued keep
# the device busy while the host waits.
STEPS_AHEAD = 2


class Pace:
    """Holds the host to at most STEPS_AHEAD steps ahead of the device, by an event recorded at each step.

    Elsewhere (CPU, MPS) the host computes each step itself, or close to it: nothing to hold.
    """

    def __init__(self, pipe: Any):
        self.marks: deque[Any] | None = deque() if on_cuda(pipe) else None

    def step(self) -> None:
        if self.marks is None:
            return
        mark = torch.cuda.Event()
        mark.record()
        self.marks.append(mark)
        if len(self.marks) > STEPS_AHEAD:
            self.marks.popleft().synchronize()  # waits with the GIL released


def on_cuda(pipe: Any) -> bool:
    return torch.device(pipe._execution_device).type == "cuda"


def generators(seed: int, count: int) -> list[torch.Generator]:
    # One CPU generator per image: image i is reproducible from seed + i alone, on any device and
    # whatever else shares its batch.
    return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(count)]


def text_inputs(pipe: Any, prompts: list[str], negatives: list[str], cfg: bool) -> dict[str, Any]:
    """What the call gets for its text: embeddings of each distinct prompt, encoded once, for SD 1/2 pipelines.

    Eight images of one prompt, or the empty negative prompt of every image, cost one text-encoder row
    instead of eight. Other pipelines (SDXL zeroes empty negatives, for one) get the prompt lists as given.
    """
    # The exact class: a subclass may encode differently (and SDXL encodes an empty negative as zeros).
    if type(pipe).__name__ != "StableDiffusionPipeline":
        return {"prompt": prompts, "negative_prompt": negatives if any(negatives) else None}
    unique = list(dict.fromkeys([*prompts, *(negatives if cfg else [])]))
    embeds, _ = pipe.encode_prompt(unique, pipe._execution_device, 1, False)
    row = {text: i for i, text in enumerate(unique)}
    inputs = {"prompt_embeds": embeds[[row[p] for p in prompts]]}
    if cfg:
        inputs["negative_prompt_embeds"] = embeds[[row[n] for n in negatives]]
    return inputs


def generate_batch(
    pipe: Any,
    requests: Sequence[dict[str, Any]],
    on_step: Callable[[int, int], None],
    *,
    pad_to: int = 0,
    tiling_pixels: int = 0,
    inputs: dict[str, Image.Image] | None = None,
    on_latents: Callable[[int, torch.Tensor, Factors], None] | None = None,
) -> list[list[Image.Image]]:
    """Run compatible requests (equal batch keys) as one call; returns each request's images, in order.

    Image i of a request is seeded `seed + i` whatever else shares the call. With `pad_to`, filler rows
    make the call exactly that many images (a compiled shape); their images are thrown away. `inputs`
    (input image, mask) belong to a single request: image tasks never share a call. `on_latents` sees
    the latents after each step (one row per image, requests in order), for previews.
    """
    if inputs and len(requests) != 1:
        raise ValueError(f"inputs: image tasks run one request per call, got {len(requests)}")
    # 1. One row per image: its prompt, negative prompt, generator and owning request.
    first = requests[0]
    prompts: list[str] = []
    negatives: list[str] = []
    gens: list[torch.Generator] = []
    owners: list[int | None] = []
    for index, request in enumerate(requests):
        count = int(request["num_images"])
        prompts += [request["prompt"]] * count
        # An absent negative prompt is the empty one: diffusers encodes None as "" too.
        negatives += [request.get("negative_prompt") or ""] * count
        gens += generators(int(request["seed"]), count)
        owners += [index] * count
    filler = pad_to - len(prompts)
    if filler > 0:
        prompts, negatives, owners = prompts + [""] * filler, negatives + [""] * filler, owners + [None] * filler
        gens += generators(0, filler)

    # 2. The call.
    # Image-to-image tasks skip the first (1 - strength) of the steps: progress counts those that run.
    total, guidance = effective_steps(first), float(first["guidance_scale"])
    width, height = int(first["width"]), int(first["height"])

    # An upscaler's latents (at the input's size, its own VAE) fit no latent-to-RGB preview map.
    factors = factors_for(pipe) if on_latents is not None and not is_upscaler(pipe) else None
    pace = Pace(pipe)

    def after_step(step: int, latents: torch.Tensor | None) -> None:
        pace.step()
        if on_latents is not None and factors is not None and latents is not None:
            on_latents(step + 1, latents, factors)
        on_step(step + 1, total)

    configure_vae(pipe, width, height, tiling_pixels)
    # Text-to-image pipelines hand back tensors, made 8-bit where they are (see `to_pil`); the others keep
    # diffusers' PIL output, which some of them post-process as PIL images (an inpainting mask's overlay).
    as_tensors = first.get("task", "txt2img") == "txt2img" and not is_upscaler(pipe)
    with torch.inference_mode():
        result = pipe(
            **text_inputs(pipe, prompts, negatives, uses_cfg(pipe, guidance)),
            num_inference_steps=int(first["steps"]),
            guidance_scale=guidance,
            generator=gens,
            output_type="pt" if as_tensors else "pil",
            **step_callback(pipe, after_step),
            **pipe_kwargs_for(first, inputs or {}),
        )
        made = to_pil(result.images) if as_tensors else result.images

    # 3. Each request gets exactly its own images back, at its size (an upscaler's native factor may differ).
    images: list[list[Image.Image]] = [[] for _ in requests]
    for owner, image in zip(owners, made, strict=True):
        if owner is not None:
            images[owner].append(fit(image, width, height) if first.get("upscaler") else image)
    return images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """RGB images in [0, 1] (batch, channel, height, width) as diffusers' own PIL conversion makes them (float32
    times 255, rounded half to even, 8 bits), but converted where they are: from a GPU, a half-precision
    batch crosses to the host in half the bytes, and the generating thread is spared four passes over its
    floats (16 images of 512x512 are 12.6 million of them) between one call and the next."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image) for image in pixels]


def step_callback(pipe: Any, after_step: Callable[[int, torch.Tensor | None], None]) -> dict[str, Any]:
    """The pipeline's per-step hook, given the step's index and latents: `callback_on_step_end`, or the older
    `callback` of the x4 upscaler."""
    if is_upscaler(pipe):

        def callback(step: int, _timestep: Any, latents: torch.Tensor) -> None:
            after_step(step, latents)

        return {"callback": callback, "callback_steps": 1}

    def step_end(_pipe: Any, step: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        after_step(step, callback_kwargs.get("latents"))
        return callback_kwargs

    return {"callback_on_step_end": step_end}


def generate(
    pipe: Any,
    request: dict[str, Any],
    on_step: Callable[[int, int], None],
    inputs: dict[str, Image.Image] | None = None,
) -> list[Image.Image]:
    """One request alone, with its input images if its task takes any."""
    return generate_batch(pipe, [request], on_step, inputs=inputs)[0]
