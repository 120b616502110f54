"""The image-to-image side of a job request: reading input images (https URL, data: URI or upload key),
checking the task's fields against the model, and storing the normalised inputs for the worker.

Inputs are fetched and decoded here, at submit time, so a bad image is the client's 422 rather than a
failed job later; the worker reads only what the API stored under `inputs/<job id>/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from shared.db import session_scope
from shared.errors import InvalidRequest
from shared.fetch import FetchPolicy, fetch_image
from shared.images import decode_image, parse_data_uri
from shared.outpaint import extend_canvas, outpaint_mask
from shared.png import encode_png
from shared.registry import ModelSpec, Registry
from shared.settings import get_settings
from shared.storage import Storage, input_key
from shared.uploads import PREFIX as UPLOAD_PREFIX
from shared.uploads import resolve_upload

MAX_LORAS = 4
# diffusers' x4 upscaler adds noise to its input at a level of 0..max_noise_level (350), 20 by default.
MAX_NOISE_LEVEL, DEFAULT_NOISE_LEVEL = 350, 20
OutputFormat = Literal["png", "jpeg", "webp"]


class Pad(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    left: int = Field(0, description="Pixels added on the left, a multiple of 8.")
    right: int = Field(0, description="Pixels added on the right, a multiple of 8.")
    top: int = Field(0, description="Pixels added on top, a multiple of 8.")
    bottom: int = Field(0, description="Pixels added at the bottom, a multiple of 8.")


def check_pad_shape(value: Any) -> Any:
    """One message for a malformed `pad`, rather than pydantic's error for each arm of `int | Pad`."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if not isinstance(value, dict):
        raise ValueError("must be an integer or an object with left, right, top, bottom")
    for side, amount in value.items():
        if side not in ("left", "right", "top", "bottom"):
            raise ValueError(f"unknown side {side!r}; the sides are left, right, top, bottom")
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise ValueError(f"{side} must be an integer number of pixels")
    return value


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(max_length=200, description="A LoRA name from GET /v1/models.")
    scale: float | None = Field(None, ge=0, description="Strength; the LoRA's default_scale when omitted.")


@dataclass
class Inputs:
    image: Image.Image | None = None
    mask: Image.Image | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        return self.image.size if self.image is not None else None


def _read_bytes(value: str, field: str, tenant_id: str) -> bytes:
    settings = get_settings()
    if value.startswith("data:"):
        data = parse_data_uri(value, field)
    elif value.startswith(UPLOAD_PREFIX):
        with session_scope() as session:
            key = resolve_upload(session, tenant_id, value, field).key
        from shared.storage import get_storage

        data = get_storage().get(key)
    elif value.lower().startswith(("https://", "http://")):
        policy = FetchPolicy(
            timeout=settings.fetch_timeout,
            max_bytes=settings.max_input_bytes,
            allow_hosts=frozenset(settings.fetch_allow_hosts),
        )
        data = fetch_image(value, field, policy)
    else:
        raise InvalidRequest(f"{field}: must be an https:// URL, a data: URI or a key from POST /v1/uploads")
    if len(data) > settings.max_input_bytes:
        raise InvalidRequest(f"{field}: image file over {settings.max_input_bytes} bytes")
    return data


def read_inputs(image: str | None, mask: str | None, tenant_id: str) -> Inputs:
    max_pixels = get_settings().max_input_pixels
    inputs = Inputs()
    if image is not None:
        inputs.image = decode_image(_read_bytes(image, "image", tenant_id), "image", max_pixels=max_pixels)
    if mask is not None:
        inputs.mask = decode_image(_read_bytes(mask, "mask", tenant_id), "mask", max_pixels=max_pixels, mode="L")
        if inputs.image is not None and inputs.mask.size != inputs.image.size:
            w, h = inputs.image.size
            raise InvalidRequest(
                f"mask: must be the size of image ({w}x{h}), got {inputs.mask.width}x{inputs.mask.height}"
            )
    return inputs


def check_task_fields(task: str, spec: ModelSpec, given: dict[str, Any], runs: ModelSpec) -> None:
    """Each task takes its own fields; a field another task uses is refused rather than ignored.

    `runs` is the model that runs the task (`Registry.runs_on`): an upscaler takes no `strength` or LoRAs.
    """
    if task not in spec.tasks:
        raise InvalidRequest(f"task: model {spec.name} does not serve {task!r}; it serves {', '.join(spec.tasks)}")
    needs = {"txt2img": set(), "img2img": {"image"}, "inpaint": {"image", "mask"}, "upscale": {"image"}}[task]
    if task == "inpaint" and given.get("pad") is not None:
        needs = {"image"}  # outpainting makes its own mask (a given one still counts inside the image)
    allowed = needs | {
        "img2img": {"strength"},
        "inpaint": {"strength", "mask", "pad"},
        "upscale": {"scale", "strength"},
    }.get(task, set())
    for field in sorted(needs):
        if given.get(field) is None:
            raise InvalidRequest(f"{field}: required for task {task!r}")
    for field in ("image", "mask", "strength", "scale", "pad"):
        if given.get(field) is not None and field not in allowed:
            raise InvalidRequest(f"{field}: not used by task {task!r}")
    if given.get("noise_level") is not None and not (task == "upscale" and runs.upscale_factor):
        raise InvalidRequest(f"noise_level: used only by upscale jobs on a model with an upscaler, not {spec.name}")
    if runs.upscale_factor:
        for field in ("strength", "loras"):
            if given.get(field):
                raise InvalidRequest(
                    f"{field}: not used by upscale jobs on {spec.name}, which run its upscaler {runs.name}"
                )


def default_size(task: str, input_size: tuple[int, int] | None, scale: int | None) -> tuple[int, int] | None:
    """The output size a task implies from its input image: the image's, or `scale` times it for upscale."""
    if input_size is None or task == "txt2img":
        return None
    w, h = input_size
    if task == "upscale":
        return (w * (scale or 2)) // 8 * 8, (h * (scale or 2)) // 8 * 8
    return max(8, w // 8 * 8), max(8, h // 8 * 8)


def generation_fields(
    *,
    spec: ModelSpec,
    registry: Registry,
    task: str,
    strength: float | None,
    noise_level: int | None,
    scale: int | None,
    scheduler: str | None,
    loras: list[LoraRef] | None,
    output_format: str,
    quality: int | None,
) -> dict[str, Any]:
    """The request fields beyond txt2img's, with the defaults of `spec` (the model that runs the task) filled in."""
    fields: dict[str, Any] = {}
    if task in ("img2img", "inpaint"):
        fields["strength"] = float(strength if strength is not None else spec.default_strength)
    if task == "upscale":
        fields["scale"] = scale or 2
        if spec.upscale_factor:
            fields["upscaler"] = spec.name  # the worker runs this model rather than the job's own
            fields["noise_level"] = noise_level if noise_level is not None else DEFAULT_NOISE_LEVEL
        else:
            fields["strength"] = float(strength if strength is not None else spec.upscale_strength)
    if scheduler is not None and scheduler not in spec.schedulers:
        raise InvalidRequest(
            f"scheduler: {scheduler!r} is not allowed for {spec.name}; use {', '.join(spec.schedulers)}"
        )
    fields["scheduler"] = scheduler or spec.default_scheduler
    chosen: list[dict[str, Any]] = []
    for ref in loras or []:
        lora = registry.loras.get(ref.name)
        if lora is None:
            known = ", ".join(sorted(registry.loras)) or "none"
            raise InvalidRequest(f"loras: unknown LoRA {ref.name!r}; available: {known}", code="unknown_lora")
        if spec.family not in lora.families:
            raise InvalidRequest(f"loras: {ref.name} is for {', '.join(lora.families)} models, not {spec.family}")
        lora_scale = ref.scale if ref.scale is not None else lora.default_scale
        if lora_scale > lora.max_scale:
            raise InvalidRequest(f"loras: scale of {ref.name} must be at most {lora.max_scale}, got {lora_scale}")
        if any(c["name"] == ref.name for c in chosen):
            raise InvalidRequest(f"loras: {ref.name} named twice")
        chosen.append({"name": ref.name, "scale": float(lora_scale)})
    fields["loras"] = chosen
    fields["output_format"] = output_format
    if quality is not None and output_format == "png":
        raise InvalidRequest("quality: only used by jpeg and webp output")
    fields["quality"] = quality if quality is not None else 90
    return fields


def store_inputs(storage: Storage, job_id: str, inputs: Inputs, request: dict[str, Any]) -> None:
    """Store the inputs the worker needs, at the size it needs them, and name their keys in `request`."""
    if inputs.image is None:
        return
    image, mask = inputs.image, inputs.mask
    pad = request.get("pad")
    if request["task"] in ("img2img", "inpaint"):
        size = (int(request["width"]), int(request["height"]))
        if pad:  # the image's size inside the padded canvas
            size = (size[0] - pad["left"] - pad["right"], size[1] - pad["top"] - pad["bottom"])
        if image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
            mask = mask.resize(size, Image.Resampling.NEAREST) if mask is not None else None
        if pad:
            image, mask = extend_canvas(image, pad), outpaint_mask(size, pad, mask)
    # upscale keeps the original: the worker enlarges it itself (an upscaler pipeline wants the low-res image).
    request["image"] = input_key(job_id, "image")
    storage.put(request["image"], encode_png(image), "image/png")
    if mask is not None:
        request["mask"] = input_key(job_id, "mask")
        storage.put(request["mask"], encode_png(mask), "image/png")
