"""The service on a GPU host against plain diffusers, with random-weight SD 1.5 and SDXL architectures.

For a lent GPU machine with no package registry, no hub and no Redis service: the models are built here
from copies of the real configs (random weights do the same arithmetic per image as real ones), the
service runs as real processes (`darkroom api` + one `darkroom worker`) on SQLite, local storage and a
`redis-server` binary started on a free port. Per architecture it prints: images/s of a burst of
compatible jobs through the service, images/s of plain diffusers one job per call and in one eager call
of the service's batch size, the latency of one job submitted to an idle worker, and the service's
fraction of the FLOP ceiling (UNet FLOPs per image from torch's FlopCounterMode, the card's bf16 matmul
rate measured here). With a worker compiled (SD 1.5's by default, SDXL's with `--xl-compile`), it also
times one DDIM job and one image-to-image job at idle (`*_ddim_job_ms`, `*_img2img_job_ms`: on the graphs
text-to-image jobs warmed, a call's time, not a compilation's), and restarts that worker on its kept
compile cache and times its first job. From the worker's log it takes the rate of its own full calls
(`*_full_call_img_per_s`): against plain diffusers' call of the same size (`*_direct_batch_img_per_s`), that
tells a slow call from a slow service around it. Compare with /work/shared/gpu-baseline (plain diffusers on
an H200). Each architecture's figures are printed as one JSON line as soon as they exist; the last line is
one JSON object of them all.

    python -m bench.gpu --redis-server /usr/bin/redis-server            # H100/H200, ~7.5 minutes
    python -m bench.gpu --redis-server /usr/bin/redis-server --arch sdxl --xl-compile   # SDXL compiled, alone
    python -m bench.gpu --device cpu --tiny --redis-server $(which redis-server)   # smoke check
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from bench.e2e import CALL_LINE, ROOT, darkroom, free_port, stop, wait_until
from bench.encode import picture

T0 = time.monotonic()

# ---- configs of the real architectures (diffusers / transformers config.json, copied) ----------------------
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    force_upcast=False,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
OPENCLIP_BIGG = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
)
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
)

# The same architectures shrunk for `--tiny` (a CPU smoke check of this script's every path).
TINY = {
    "sd15_unet": dict(
        SD15_UNET,
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    ),
    "sdxl_unet": dict(
        SDXL_UNET,
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=64,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        norm_num_groups=8,
    ),
    "vae": dict(VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
    "clip_l": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    "bigg": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
}


def log(message: str) -> None:
    print(f"{time.monotonic() - T0:7.1f}s {message}", file=sys.stderr, flush=True)


# ---- models ---------------------------------------------------------------------------------------------
def build(arch: str, directory: Path, tiny: bool, dtype: Any, device: str) -> Path:
    """Build a random-weight pipeline of `arch` ("sd15" or "sdxl") and save it where a worker can load it."""
    import torch
    from transformers import CLIPTokenizer

    from worker.tiny import write_tokenizer_files

    torch.manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = write_tokenizer_files(directory.parent)
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    # A small byte-level vocabulary, but the real embedding table size: the text encoders cost the same.
    common = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    size = 64 if tiny else (512 if arch == "sd15" else 1024)
    # Initialised on the device: random init of SDXL's 2.6 B UNet parameters on a CPU takes minutes.
    with torch.device(device):
        return _save(arch, directory, tiny, dtype, tokenizer, common, size)


def _save(
    arch: str, directory: Path, tiny: bool, dtype: Any, tokenizer: Any, common: dict[str, Any], size: int
) -> Path:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vae = AutoencoderKL(
        **(TINY["vae"] if tiny else VAE),
        sample_size=size,
        scaling_factor=0.18215 if arch == "sd15" else 0.13025,
    )
    scheduler = EulerDiscreteScheduler(**SCHEDULER)
    clip_l = CLIPTextModel(CLIPTextConfig(**(TINY["clip_l"] if tiny else CLIP_L), **common))
    pipe: Any
    if arch == "sd15":
        unet = UNet2DConditionModel(**(TINY["sd15_unet"] if tiny else SD15_UNET))
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=clip_l,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        unet = UNet2DConditionModel(**(TINY["sdxl_unet"] if tiny else SDXL_UNET))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**(TINY["bigg"] if tiny else OPENCLIP_BIGG), **common))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=clip_l,
            text_encoder_2=big_g,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    pipe.to(dtype=dtype).save_pretrained(directory)
    return directory


def unet_tflop_per_image(pipe: Any, arch: str, size: int, steps: int, device: str) -> float:
    """UNet FLOPs of one image: one classifier-free-guidance call (batch 2) per step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, dtype = pipe.unet, pipe.unet.dtype
    latent = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    added = None
    if arch == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(2, pooled, device=device, dtype=dtype),
            "time_ids": torch.randn(2, 6, device=device, dtype=dtype),
        }
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(latent, torch.tensor([500], device=device), text, added_cond_kwargs=added)
    return counter.get_total_flops() * steps / 1e12


def matmul_tflops(device: str) -> float:
    """The card's measured bf16 matmul rate (as in the GPU baseline); on a CPU, fp32 at a small size."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device.startswith("cuda") else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn_like(a)

    def timed() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()
    return 10 * 2 * n**3 / min(timed() for _ in range(3)) / 1e12


def direct(
    model_dir: Path, args: argparse.Namespace, size: int, dtype: Any, count: int, batch: int
) -> tuple[float, float, Any]:
    """Plain diffusers, eager: images/s one job (one image) per call, and in one call of `batch` images (the
    service's batch: what the worker's own calls are held against); and the loaded pipeline for FLOP counting."""
    import torch
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    pipe.watermark = None  # diffusers' own SDXL mark: the baseline (../shared/gpu-baseline) and the worker run without
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)

    def call(seeds: list[int]) -> float:
        start = time.perf_counter()
        pipe(
            prompt=[f"direct {seed}" for seed in seeds],
            width=size,
            height=size,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    call([0])  # warm-up
    single = count / sum(call([seed]) for seed in range(count))
    call(list(range(batch)))  # warm-up at this shape
    return single, batch / call(list(range(batch))), pipe


# ---- the service ----------------------------------------------------------------------------------------
class Service:
    def __init__(
        self,
        workdir: Path,
        args: argparse.Namespace,
        models_file: Path,
        redis_url: str,
        model: str,
        *,
        batch: int,
        compiled: bool,
        shapes: str,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")},
            "HF_HUB_OFFLINE": "1",
            "DARKROOM_ENV_FILE": "",
            "DARKROOM_DATA_DIR": str(workdir),
            "DARKROOM_REDIS_URL": redis_url,
            "DARKROOM_REDIS_PREFIX": f"bench-gpu-{model}:",
            "DARKROOM_PUBLIC_URL": self.url,
            "DARKROOM_SECRET_KEY": "bench-secret",
            "DARKROOM_MODELS_FILE": str(models_file),
            "DARKROOM_DEFAULT_MODEL": model,
            "DARKROOM_DEVICE": args.device,
            "DARKROOM_MAX_BATCH_IMAGES": str(batch),
            "DARKROOM_PROGRESS_INTERVAL": "0.5",
            "DARKROOM_COMPILE": "1" if compiled else "0",
            "DARKROOM_COMPILE_SHAPES": shapes,
            "DARKROOM_COMPILE_TUNING": "1" if compiled and args.compile_tuning else "0",
            "DARKROOM_INDUCTOR_CACHE_DIR": str(args.cache_dir or workdir / "inductor-cache"),
            # A job that compiles its shape first must not time out.
            "DARKROOM_JOB_SOFT_TIME_LIMIT": "900",
            "DARKROOM_JOB_HARD_TIME_LIMIT": "960",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args], env=self.env, cwd=ROOT, check=True, capture_output=True, text=True
        )
        return done.stdout.strip()

    def start(self) -> None:
        self.cli("migrate")
        self.headers = {"Authorization": f"Bearer {self.cli('keys', 'create', '--tenant', 'bench')}"}
        self.procs.append(
            darkroom(["api", "--port", str(self.port), "--log-level", "warning"], self.env, self.workdir / "api.log")
        )
        worker_log = self.workdir / "worker.log"
        self.procs.append(darkroom(["worker", "--log-level", "info"], self.env, worker_log))
        wait_until(lambda: self._healthy(), 60, "API up")
        wait_until(lambda: "ready." in worker_log.read_text(errors="replace"), 120, "worker ready")

    def restart_worker(self, size: int, steps: int) -> float:
        """Seconds from a fresh worker process's start to its first job succeeded (compile cache kept)."""
        worker = self.procs.pop()
        stop(worker)
        worker_log = self.workdir / "worker-restarted.log"
        start = time.perf_counter()
        self.procs.append(darkroom(["worker", "--log-level", "info"], self.env, worker_log))
        with httpx.Client(timeout=60) as client:
            self.wait(client, self.submit(client, 9000, size, steps), timeout=300)
        return time.perf_counter() - start

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)

    def submit(self, client: httpx.Client, seed: int, size: int, steps: int) -> str:
        return str(self.post(client, seed, size, steps)["id"])

    def post(
        self, client: httpx.Client, seed: int, size: int, steps: int, wait_s: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """The new job (`fields` added to its request); with `wait_s`, the answer waits (`Prefer: wait`) until
        the job ends or that long."""
        body = {"prompt": f"bench {seed}", "width": size, "height": size, "steps": steps, "seed": seed, **fields}
        headers = {**self.headers, "Prefer": f"wait={wait_s}"} if wait_s else self.headers
        response = client.post(f"{self.url}/v1/jobs", json=body, headers=headers)
        response.raise_for_status()
        job: dict[str, Any] = response.json()
        return job

    def wait(self, client: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job = client.get(f"{self.url}/v1/jobs/{job_id}", headers=self.headers).json()
            return job if job["status"] in ("succeeded", "failed", "canceled") else None

        job: dict[str, Any] = wait_until(done, timeout, f"job {job_id}", interval=0.02)
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
        return job

    def burst(self, n: int, size: int, steps: int) -> float:
        with httpx.Client(timeout=60) as client:
            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(lambda i: self.submit(client, 1000 + i, size, steps), range(n)))
            for job_id in ids:
                self.wait(client, job_id, timeout=600)
            return n / (time.perf_counter() - start)

    def idle_latency(self, n: int, size: int, steps: int) -> tuple[float, float]:
        """p50 of submit -> running and of submit -> succeeded (ms), one job at a time on an idle worker.

        Each job is submitted with `Prefer: wait`, as a caller after the lowest latency would: the answer comes
        when the job ends, not at the next poll.
        """
        starts, totals = [], []
        with httpx.Client(timeout=90) as client:
            for i in range(n):
                t = time.perf_counter()
                job = self.post(client, 5000 + i, size, steps, wait_s=60)
                if job["status"] != "succeeded":  # not ended within the wait
                    job = self.wait(client, job["id"], timeout=600)
                totals.append((time.perf_counter() - t) * 1000)
                starts.append(_ms(job["created_at"], job["started_at"]))
                time.sleep(0.2)
        return statistics.median(starts), statistics.median(totals)

    def job_ms(self, size: int, steps: int, **fields: Any) -> float:
        """Submit to succeeded (ms) of one job with these request fields, on an idle worker."""
        with httpx.Client(timeout=90) as client:
            t = time.perf_counter()
            job = self.post(client, 7000, size, steps, wait_s=60, **fields)
            if job["status"] != "succeeded":
                self.wait(client, job["id"], timeout=600)
            return (time.perf_counter() - t) * 1000


def png_data_uri(size: int) -> str:
    """A size x size picture, smooth as generated ones are, as a PNG `data:` URI: an image-to-image job's input."""
    buffer = io.BytesIO()
    picture(size, seed=0).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def call_rates(worker_log: Path, batch: int) -> list[float]:
    """Images/s of each of the worker's calls of `batch` images (padding counted as images), from its log."""
    rates = []
    for _images, padded, ms in CALL_LINE.findall(worker_log.read_text(errors="replace")):
        if int(padded) == batch and int(ms) > 0:
            rates.append(int(padded) * 1000 / int(ms))
    return rates


def _ms(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds() * 1000


def start_redis(binary: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=(workdir / "redis.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: _pings(redis.Redis.from_url(url)), 20, "redis-server up")
    return proc, url


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


# ---- one architecture -----------------------------------------------------------------------------------
def bench_arch(arch: str, args: argparse.Namespace, workdir: Path, redis_url: str, ceiling: float) -> dict[str, Any]:
    import torch

    on_gpu = args.device.startswith("cuda")
    dtype = torch.float16 if on_gpu else torch.float32
    size = 64 if args.tiny else (512 if arch == "sd15" else 1024)
    jobs = args.jobs if arch == "sd15" else args.xl_jobs
    batch = args.batch if arch == "sd15" else args.xl_batch
    # SDXL's compilation does not fit a whole run's time budget beside SD 1.5's: only with --xl-compile.
    compiled = args.compile and (arch == "sd15" or args.xl_compile)
    shapes = args.compile_shapes if arch == "sd15" else args.xl_compile_shapes
    log(f"{arch}: building random weights")
    model_dir = build(arch, workdir / "models" / arch, args.tiny, dtype, args.device)
    models_file = workdir / f"models-{arch}.toml"
    models_file.write_text(
        f'[models.{arch}]\nfamily = "{"sd1" if arch == "sd15" else "sdxl"}"\nsource = "{model_dir}"\n'
        f'dtype = "{"fp16" if on_gpu else "fp32"}"\ndefault_width = {size}\ndefault_height = {size}\n'
        f"min_size = 64\nmax_width = {max(size, 1024)}\nmax_height = {max(size, 1024)}\n"
        f"default_steps = {args.steps}\n"
    )
    service = Service(workdir / arch, args, models_file, redis_url, arch, batch=batch, compiled=compiled, shapes=shapes)
    (workdir / arch).mkdir(parents=True, exist_ok=True)
    service.start()
    try:
        log(f"{arch}: worker loads (and compiles) the model")
        with httpx.Client(timeout=60) as client:  # first job: loading, compiling the configured shapes
            start = time.perf_counter()
            service.wait(client, service.submit(client, 0, size, args.steps), timeout=600)
            first_job_s = time.perf_counter() - start
        service.burst(batch, size, args.steps)  # a full batch once, as a burst's calls will be
        if compiled:  # the worker warms its listed shapes one at a time between batches
            from worker.acceleration import parse_shapes

            listed = len(parse_shapes(shapes))
            worker_log = workdir / arch / "worker.log"

            def warmed() -> bool:  # or given up: a failed compilation leaves the model eager
                text = worker_log.read_text(errors="replace")
                return text.count("compiled shape") >= listed or "failed; it runs eagerly" in text

            wait_until(warmed, 900, "shapes warmed")
        log(f"{arch}: burst of {jobs} jobs")
        service_rate = service.burst(jobs, size, args.steps)
        log(f"{arch}: idle latency")
        idle_start, idle_total = service.idle_latency(args.idle, size, args.steps)
        others: dict[str, float] = {}
        if compiled:  # on the graphs warmed by text-to-image jobs too: a new compilation would take a minute
            log(f"{arch}: one DDIM job and one image-to-image job at idle")
            others["ddim"] = service.job_ms(size, args.steps, scheduler="ddim")
            others["img2img"] = service.job_ms(size, args.steps, task="img2img", image=png_data_uri(size), strength=0.7)
        restart_s = None
        if args.restart and compiled:
            log(f"{arch}: worker restarted on the kept compile cache")
            restart_s = service.restart_worker(size, args.steps)
    finally:
        service.stop()
    log(f"{arch}: plain diffusers, one job per call, then one call of {batch}")
    direct_rate, direct_batch_rate, pipe = direct(model_dir, args, size, dtype, args.direct_images, batch)
    tflop = unet_tflop_per_image(pipe, arch, size, args.steps, args.device)
    del pipe
    if on_gpu:
        torch.cuda.empty_cache()
    results = {
        f"{arch}_batch": batch,
        f"{arch}_compiled": compiled,
        f"{arch}_compile_tuning": compiled and args.compile_tuning,
        f"{arch}_first_job_s": round(first_job_s, 1),
        f"{arch}_service_img_per_s": round(service_rate, 3),
        f"{arch}_direct_img_per_s": round(direct_rate, 3),
        f"{arch}_service_vs_direct": round(service_rate / direct_rate, 3),
        f"{arch}_direct_batch_img_per_s": round(direct_batch_rate, 3),
        f"{arch}_idle_start_p50_ms": round(idle_start, 1),
        f"{arch}_idle_job_p50_ms": round(idle_total, 1),
        f"{arch}_unet_tflop_per_image": float(f"{tflop:.4g}"),
        f"{arch}_flop_ceiling_img_per_s": round(ceiling / tflop, 2),
        f"{arch}_fraction_of_ceiling": float(f"{service_rate * tflop / ceiling:.4g}"),
    }
    for name, ms in others.items():
        results[f"{arch}_{name}_job_ms"] = round(ms, 1)
    if restart_s is not None:
        results[f"{arch}_restart_first_job_s"] = round(restart_s, 1)
    full_calls = call_rates(workdir / arch / "worker.log", batch)
    if full_calls:  # the worker's own full calls: how much of the gap to the ceiling is the call itself
        results[f"{arch}_full_call_img_per_s"] = round(statistics.median(full_calls), 3)
    # Each architecture's figures as soon as they exist: a run cut short keeps what it measured.
    print(json.dumps(results), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shrunk architectures (CPU smoke check)")
    parser.add_argument("--redis-server", required=True, help="path of a redis-server binary to start")
    parser.add_argument("--arch", choices=["sd15", "sdxl", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=64, help="burst size for SD 1.5")
    parser.add_argument("--xl-jobs", type=int, default=16, help="burst size for SDXL")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 30; 4 with --tiny)")
    parser.add_argument("--batch", type=int, default=16, help="DARKROOM_MAX_BATCH_IMAGES of the SD 1.5 worker")
    parser.add_argument("--xl-batch", type=int, default=8, help="DARKROOM_MAX_BATCH_IMAGES of the SDXL worker")
    parser.add_argument("--idle", type=int, default=5, help="jobs for the idle latency")
    parser.add_argument("--direct-images", type=int, default=8, help="images for plain diffusers")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="every worker runs eager")
    parser.add_argument("--compile-shapes", default="512x512x1,512x512x16")
    parser.add_argument(
        "--xl-compile",
        action="store_true",
        help="the SDXL worker compiled too (with --arch sdxl: it needs a run alone)",
    )
    parser.add_argument("--xl-compile-shapes", default="1024x1024x1,1024x1024x8")
    parser.add_argument(
        "--compile-tuning",
        action="store_true",
        help="compiled workers with DARKROOM_COMPILE_TUNING (inductor's Diffusion-Fast settings; longer cold compiles)",
    )
    parser.add_argument(
        "--cpu-compile", action="store_true", help="compile on a CPU too (smoke check of compile and restart)"
    )
    parser.add_argument("--no-restart", dest="restart", action="store_false", help="skip the warm-restart figure")
    parser.add_argument("--workdir", type=Path, help="keep models, logs and caches here (default: a temp dir)")
    parser.add_argument("--cache-dir", type=Path, help="inductor cache kept across runs (default: a temp dir)")
    parser.add_argument("--budget-s", type=float, default=480, help="whole run; SDXL is skipped if it would not fit")
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.tiny else 30)
    if args.device == "cpu" and not args.cpu_compile:
        args.compile = False
    sys.path.insert(0, str(ROOT))

    import torch

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    ceiling = matmul_tflops(args.device)
    log(f"{device_name}: matmul {ceiling:.1f} TFLOP/s")
    results: dict[str, Any] = {"device": device_name, "matmul_tflops": round(ceiling, 2), "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="darkroom-gpu-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        redis_proc, redis_url = start_redis(args.redis_server, workdir)
        try:
            for arch in ("sd15", "sdxl") if args.arch == "both" else (args.arch,):
                # SDXL needs about 170 s (building, loading, its burst and plain diffusers), and some 2 to 3
                # minutes more per shape compiled (118 s for the UNet alone at one image, on the H200).
                needed = 170 + (150 * len(args.xl_compile_shapes.split(",")) if args.xl_compile else 0)
                if arch == "sdxl" and args.arch == "both" and time.monotonic() - T0 > args.budget_s - needed:
                    log("sdxl skipped: not enough of the time budget left")
                    continue
                results.update(bench_arch(arch, args, workdir, redis_url, ceiling))
        finally:
            stop(redis_proc)
    results["total_s"] = round(time.monotonic() - T0, 1)

    table = Table(title=f"darkroom on {device_name}, {args.steps} steps")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, str(value))
    Console(stderr=True).print(table)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
