"""GPU execution options: channels_last, torch.compile over warmed shape buckets, VAE tiling for big images.

Compiling covers the UNet (CUDA graphs) and the VAE's decoder (inductor's fused kernels, no CUDA graphs),
as diffusers' and PyTorch's own speed-up recipes do: plain diffusers compiled, the baseline to beat, compiles
the UNet alone, and its eager decoder runs memory-bound passes over full-size activations (22.8 ms an image
of 512x512 on an H200) that inductor fuses.

channels_last is for CUDA only, and compile is off unless `DARKROOM_COMPILE=1`. Attention is left to
diffusers' default processor, which calls torch's scaled_dot_product_attention (SDPA): nothing here
replaces the attention processors, so SDPA stays on.

A compiled model serves before it is warm, and only its warmed shapes run compiled. On an H200, a
restarted SD 1.5 worker spent 17.7 s re-tracing its two shapes from the kept compile cache (and minutes with
a cold one) before its first job, which then took 0.24 s; eager, it takes about 1.4 s (plain diffusers,
0.71 images/s). So a call runs compiled only at a shape already warmed (`stance`), and eagerly otherwise:
a freshly loaded model's first calls, and any shape not listed, which would otherwise be compiled in the
middle of somebody's job. The listed shapes are warmed one at a time between batches (`warm_next`), in the
order listed, after a batch's images are on their way to storage and before the worker claims more: jobs
wait for at most one shape's compilation, not for all of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.settings import Settings
from worker.upscale import is_upscaler

if TYPE_CHECKING:  # torch loads where it is used: a pool process sets the compile cache before importing it
    import torch

log = logging.getLogger("darkroom.worker")

# The prompt used to warm compiled shapes; what it says does not matter, only the tensor shapes do.
_WARM_PROMPT = "warm-up"
# Shapes are warmed with guidance, as nearly every job runs (a job without it runs eagerly).
WARM_GUIDANCE = 7.5
# torch.compile's options for a UNet. Static shapes: calls are padded to the listed buckets, so each bucket
# gets kernels specialised to its sizes; by default a second shape would turn the batch dimension symbolic
# for every bucket.
COMPILE_OPTIONS: dict[str, Any] = {"mode": "reduce-overhead", "dynamic": False}
# And for the VAE's decode: a few large kernels a call, so CUDA graphs would save little and hold a memory
# pool of full-size activations per warmed shape; inductor's fusions are the gain.
DECODE_COMPILE_OPTIONS: dict[str, Any] = {"dynamic": False}
# DARKROOM_COMPILE_TUNING: the inductor settings of PyTorch's "Diffusion, Fast" recipe and of Hugging Face's
# ahead-of-time compiled Spaces, epilogue fusion off as both have it. A UNet's 1x1 convolutions (attention
# block projections, skip connections) become matrix multiplies; coordinate descent benchmarks launch
# configurations around each generated kernel's heuristic one, which is what lengthens a cold compile.
# Global: every compilation in a worker is a model's UNet or decode. Opt-in until a GPU run measures it.
INDUCTOR_TUNING: dict[str, Any] = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}
# Graphs TorchDynamo keeps per function, above which it runs the function eagerly, silently. Its default
# of 8 is a guard against recompiling on every call; here each listed shape of each loaded model is one
# graph of the same UNet forward (and one of the VAE's decode), compiled once, when it is warmed.
RECOMPILE_LIMIT = 64


@dataclass
class Warmth:
    """A model's compiled UNet and decode, and its shapes: those still to warm (listed), and those warmed (with
    whether the UNet ran two rows per image for them, as with classifier-free guidance)."""

    compiled: Any  # torch.compile's wrapper of the pipeline's own UNet, which stays in the pipeline
    vae: Any  # the pipeline's own VAE, or None
    decode: Any  # torch.compile's wrapper of that VAE's decode, or None
    pending: list[tuple[int, int, int]]
    tiling_pixels: int  # DARKROOM_VAE_TILING_PIXELS: shapes above it decode in tiles, eagerly
    warmed: set[tuple[int, int, int, bool]] = field(default_factory=set)
    failed: bool = False  # compiling failed: the model runs eagerly for as long as it is loaded


# By loaded pipeline: the entry goes with it when the cache evicts it (the wrapper holds its UNet).
_compiled: weakref.WeakKeyDictionary[Any, Warmth] = weakref.WeakKeyDictionary()


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """`512x512x1,512x512x8` -> [(512, 512, 1), (512, 512, 8)] (width, height, images per call)."""
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            width, height, batch = (int(n) for n in item.lower().split("x"))
        except ValueError as exc:
            raise ValueError(f"DARKROOM_COMPILE_SHAPES: {item!r} is not WIDTHxHEIGHTxBATCH") from exc
        shapes.append((width, height, batch))
    return shapes


def bucket_for(images: int, width: int, height: int, shapes: list[tuple[int, int, int]]) -> int:
    """Images per call to run `images` at: the smallest warmed bucket that holds them, else `images` as is.

    Padding up to a compiled shape costs a few wasted rows; a shape not listed runs eagerly (see `stance`).
    """
    sizes = sorted(b for w, h, b in shapes if (w, h) == (width, height) and b >= images)
    return sizes[0] if sizes else images


def configure_compile_cache(settings: Settings) -> None:
    """Point inductor at a cache that outlives the process, so a restarted worker starts warm."""
    if not settings.compile:
        return
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.inductor_cache_dir))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def prepare(pipe: Any, device: torch.device, settings: Settings) -> Any:
    """Apply the execution options to a freshly loaded pipeline (already on `device`)."""
    import torch

    # Inference only: no weight needs a gradient. Frozen from the start, the UNet's weights are as they are
    # after its LoRAs are unloaded (PEFT freezes each layer it wraps), which its compiled graphs are guarded on.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    if device.type == "cuda":
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
    # Compiled shapes are text-to-image shapes; an upscaler's follow its input images, so it runs eagerly.
    # The pipeline keeps its own UNet: diffusers loads LoRAs into it (a compiled wrapper has no adapters to
    # set), and every pipeline built over this one shares it (worker/variants.py). Calls at a warmed shape
    # swap the wrapper in (`stance`).
    if settings.compile and getattr(pipe, "unet", None) is not None and not is_upscaler(pipe):
        configure_compile_cache(settings)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        if settings.compile_tuning:
            import torch._inductor.config

            for name, value in INDUCTOR_TUNING.items():
                setattr(torch._inductor.config, name, value)
        vae = getattr(pipe, "vae", None)
        unet: Any = torch.compile(pipe.unet, **COMPILE_OPTIONS)  # an OptimizedModule, typed as a callable
        # Outside the compiled graph: a wrapper's own hooks run before it is entered.
        unet.register_forward_pre_hook(_steady_inputs, with_kwargs=True)
        _compiled[pipe] = Warmth(
            unet,
            vae,
            torch.compile(vae.decode, **DECODE_COMPILE_OPTIONS) if vae is not None else None,
            parse_shapes(settings.compile_shapes),
            settings.vae_tiling_pixels,
        )
    return pipe


def _steady_inputs(_unet: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The UNet's inputs in one memory layout and the timestep in one dtype, whatever the job: a compiled
    graph is guarded on both, and a call at a warmed shape must not compile anew (minutes, with a job
    waiting). With channels_last modules, as on a GPU, image-to-image and inpainting start from VAE-encoded
    latents in channels_last, where text-to-image starts from contiguous noise; DDIM, PNDM and the DPM
    solvers give int64 timesteps, Euler float32. Making a tensor contiguous copies only a latent's few
    hundred kB, and the UNet embeds a timestep as float32 whatever its dtype, so nothing else changes."""
    import torch

    args = tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)
    kwargs = {k: v.contiguous() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    sample = args[0] if args else kwargs["sample"]
    if len(args) > 1:
        args = (args[0], torch.as_tensor(args[1], dtype=torch.float32, device=sample.device), *args[2:])
    elif "timestep" in kwargs:
        kwargs["timestep"] = torch.as_tensor(kwargs["timestep"], dtype=torch.float32, device=sample.device)
    return args, kwargs


def uses_cfg(pipe: Any, guidance_scale: float) -> bool:
    """Whether a call runs classifier-free guidance: two UNet rows per image (not for a guidance-distilled
    UNet, which takes the scale as an input)."""
    unet = getattr(pipe, "unet", None)
    return guidance_scale > 1 and (unet is None or getattr(unet.config, "time_cond_proj_dim", None) is None)


def _warmth(pipe: Any) -> Warmth | None:
    """The compiled UNet of `pipe`, a loaded pipeline or one built over it, if it is compiled and can run so."""
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(unet, "peft_config", None):
        return None  # with LoRAs loaded, the UNet is no longer the module the wrapper traced
    return _wrapping(unet)


def has_compiled_unet(pipe: Any) -> bool:
    """Whether `pipe`'s UNet has a compiled wrapper it can run with (its LoRAs unloaded, if any are loaded)."""
    unet = getattr(pipe, "unet", None)
    return unet is not None and _wrapping(unet) is not None


def _wrapping(unet: Any) -> Warmth | None:
    return next((w for w in _compiled.values() if w.compiled._orig_mod is unet and not w.failed), None)


def _warm_at(pipe: Any, width: int, height: int, images: int, guidance_scale: float) -> Warmth | None:
    """`pipe`'s compiled UNet if it is warm for a call of `images` images at `width`x`height`, guidance
    included (without it the UNet takes half the rows, a shape of its own)."""
    warmth = _warmth(pipe)
    if warmth is None or (width, height, images, uses_cfg(pipe, guidance_scale)) not in warmth.warmed:
        return None
    return warmth


def compiled_at(pipe: Any, width: int, height: int, images: int, guidance_scale: float) -> bool:
    """Whether such a call runs `pipe`'s UNet compiled: at a warmed shape (see `_warm_at`)."""
    return _warm_at(pipe, width, height, images, guidance_scale) is not None


@contextlib.contextmanager
def stance(pipe: Any, width: int, height: int, images: int, guidance_scale: float) -> Iterator[None]:
    """The compiled UNet and decode in a call at a warmed shape; the pipeline's own, eager, in any other: a
    call must not wait for a compilation (nor fail in one)."""
    warmth = _warm_at(pipe, width, height, images, guidance_scale)
    if warmth is None:
        yield
        return
    with _swapped(pipe, warmth):
        yield


@contextlib.contextmanager
def _swapped(pipe: Any, warmth: Warmth) -> Iterator[None]:
    """The compiled UNet in the pipeline, and the compiled decode on its VAE (shared by every pipeline built
    over it, unless one brings its own), for the length of one call."""
    own = pipe.unet
    pipe.unet = warmth.compiled
    vae = warmth.vae if warmth.decode is not None and getattr(pipe, "vae", None) is warmth.vae else None
    if vae is not None:
        vae.decode = _untiled_decode(vae, warmth.decode)
    try:
        yield
    finally:
        pipe.unet = own
        if vae is not None:
            del vae.decode  # the instance's attribute: the class's own decode shows through again


def _untiled_decode(vae: Any, compiled: Any) -> Any:
    """`vae.decode` through its compiled wrapper, which is warmed untiled: a call that decodes in tiles or
    slices (set per call, see `configure_vae`) runs the VAE's own decode instead of a new compilation."""
    own = vae.decode

    def decode(z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        if getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False):
            return own(z, return_dict=return_dict, generator=generator)
        # Without the generators: decode ignores them, and each job's own must not become a graph's guard.
        # Contiguous, as the UNet's inputs (see `_steady_inputs`).
        (sample,) = compiled(z.contiguous(), return_dict=False)
        if not return_dict:
            return (sample,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample)

    return decode


def cold() -> bool:
    """Whether a loaded model has listed shapes still to warm."""
    return any(w.pending for pipe, w in _compiled.items() if _warmth(pipe) is w)


def warm_next() -> None:
    """Warm the next listed shape of a loaded model. A failure is logged, and that model goes on eagerly;
    the time limit's exception goes through (the shape stays to warm)."""
    from celery.exceptions import SoftTimeLimitExceeded

    for pipe, warmth in list(_compiled.items()):
        if not warmth.pending or _warmth(pipe) is not warmth:
            continue
        shape = warmth.pending[0]
        try:
            with _swapped(pipe, warmth):
                warm(pipe, *shape, tiling_pixels=warmth.tiling_pixels)
        except SoftTimeLimitExceeded:
            raise
        except Exception:
            log.exception("compiling the model at %dx%d x%d failed; it runs eagerly", *shape)
            warmth.failed = True
        else:
            warmth.warmed.add((*shape, uses_cfg(pipe, WARM_GUIDANCE)))
        warmth.pending.pop(0)
        return


def warm(pipe: Any, width: int, height: int, batch: int, *, tiling_pixels: int = 0) -> None:
    """Compile one shape now (two steps, then the decode as the call's own would run it), not in the middle
    of somebody's job."""
    import torch

    started = time.monotonic()
    configure_vae(pipe, width, height, tiling_pixels)
    tiled = getattr(getattr(pipe, "vae", None), "use_tiling", False)
    with torch.inference_mode():
        pipe(
            prompt=[_WARM_PROMPT] * batch,
            width=width,
            height=height,
            num_inference_steps=2,
            guidance_scale=WARM_GUIDANCE,
            # A tiled decode runs eagerly (see `_untiled_decode`): nothing of it to compile.
            output_type="latent" if tiled else "pt",
        )
    log.info("compiled shape %dx%d x%d in %.1f s", width, height, batch, time.monotonic() - started)


def configure_vae(pipe: Any, width: int, height: int, tiling_pixels: int) -> None:
    """Big images decode in tiles, one at a time, so the VAE's activations fit beside a batch's latents."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "enable_tiling"):
        return
    if tiling_pixels and width * height > tiling_pixels:
        vae.enable_tiling()
        vae.enable_slicing()
    else:
        vae.disable_tiling()
        vae.disable_slicing()
