"""The built-in test models: tiny, randomly initialised SD 1.x, SD 2.x-style and SDXL pipelines, an x4
upscaler, and a LoRA.

It is built from the real diffusers/transformers classes and saved with `save_pretrained`, so workers load
it through exactly the code path of a real model. It makes noise, not pictures, in milliseconds on a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map, which CLIP's byte-level BPE is built on.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """A small byte-level BPE vocabulary: every byte alone and word-final, plus a few common merges."""
    chars = list(_bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>"), ("i", "n"), ("e", "r</w>")]
    tokens = [
        *chars,
        *(c + "</w>" for c in chars),
        *("".join(m) for m in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


def _tokenizer() -> Any:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_tokenizer_files(Path(tmp))
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)


def _text_config(tokenizer: Any, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # Four VAE blocks give the real SD downsampling factor of 8, so sizes behave as with real models.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )


def _scheduler(**extra: Any) -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
        **extra,
    )


def build_tiny_sd(seed: int = 0, *, v_prediction: bool = False) -> Any:
    """SD 1.x layout; with `v_prediction`, the SD 2.x variant (v-prediction, linear attention projections)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=v_prediction,
    )
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(prediction_type="v_prediction") if v_prediction else _scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl(seed: int = 0) -> Any:
    """SDXL layout: two text encoders (the second with a projection), micro-conditioning ("text_time")."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _tokenizer(), _tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # 6 micro-conditioning numbers x 8 + the pooled 32-dim embedding of text_encoder_2.
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,  # darkroom watermarks every output itself (worker/watermark.py)
    )


def build_tiny_x4_upscaler(seed: int = 0) -> Any:
    """diffusers' x4 upscaler layout (stabilityai/stable-diffusion-x4-upscaler, scaled down): the UNet denoises
    latents at the input's size, conditioned on the noised input image (3 extra channels) and its noise level
    (a class embedding); a VAE with three blocks decodes them at 4x."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=7,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        num_class_embeds=351,  # one per noise level, 0..max_noise_level
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16),  # two downsamplings: the x4 upscaler's factor of 4
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.08333,  # the x4 upscaler's own, which the pipeline insists on
    )
    common = {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(**common),
        scheduler=DDIMScheduler(prediction_type="v_prediction", **common),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,  # darkroom watermarks every output itself (worker/watermark.py)
        max_noise_level=350,
    )


def build_tiny_lora(directory: Path, seed: int = 1) -> Path:
    """A random LoRA for tiny-sd's UNet, made from a PEFT LoraConfig and saved as diffusers LoRA safetensors."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = build_tiny_sd().unet
    torch.manual_seed(seed)
    # init_lora_weights=False: random A and B, so the LoRA visibly changes the output (B=0 would not).
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    StableDiffusionPipeline.save_lora_weights(
        str(directory), unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return directory


BUILDERS = {
    "tiny-sd": lambda d: build_tiny_sd().save_pretrained(d),
    "tiny-sd2": lambda d: build_tiny_sd(v_prediction=True).save_pretrained(d),
    "tiny-sdxl": lambda d: build_tiny_sdxl().save_pretrained(d),
    "tiny-x4-upscaler": lambda d: build_tiny_x4_upscaler().save_pretrained(d),
    "tiny-lora": build_tiny_lora,
}
# What marks a finished build of each kind.
DONE_FILE = {"tiny-lora": "pytorch_lora_weights.safetensors"}


def make_tiny(directory: Path, kind: str = "tiny-sd") -> Path:
    """Build and save a built-in model into `directory` atomically (a half-written model is never seen)."""
    directory = Path(directory)
    done = DONE_FILE.get(kind, "model_index.json")
    if (directory / done).exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        BUILDERS[kind](staging)
        try:
            os.rename(staging, directory)
        except OSError:
            if not (directory / done).exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
