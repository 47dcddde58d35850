"""Reading and writing model folders in the layout of the published SV-DRR checkpoints.

    model_index.json
    vae/            AutoencoderKL                      (optional for our own pixel-space models)
    image_encoder/  CLIPVisionModelWithProjection      (optional)
    transformer/    PixArtTransformer2DModel-compatible ("SvdrrTransformer2DModel" in its config)
    cc_projection/  CCProjection
    scheduler/      DPMSolverMultistepScheduler

``model_index.json`` of the published folders names custom classes, so
``DiffusionPipeline.from_pretrained`` cannot load them: every component is loaded here from its
subfolder with the stock class, from local files only (never a hub download).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from transformers import CLIPVisionModelWithProjection

from dicomnode.errors import ModelLoadError
from synthesis.projection import CCProjection

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
REQUIRED = ("transformer", "cc_projection", "scheduler")
OPTIONAL = ("vae", "image_encoder")
WEIGHTED = ("vae", "image_encoder", "transformer", "cc_projection")
# What save_pretrained writes in model_index.json (library, class); the loader reads only null-ness.
INDEX_CLASSES = {
    "vae": ("diffusers", "AutoencoderKL"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
    "transformer": ("diffusers", "PixArtTransformer2DModel"),
    "cc_projection": ("synthesis", "CCProjection"),
    "scheduler": ("diffusers", "DPMSolverMultistepScheduler"),
}


def read_model_index(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist or is not a folder")
    index_path = folder / MODEL_INDEX
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError as e:
        raise ModelLoadError(f"{folder}: {MODEL_INDEX} is missing; not a model folder") from e
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder}: {MODEL_INDEX} is not valid JSON: {e}") from e
    if not isinstance(index, dict):
        raise ModelLoadError(f"{folder}: {MODEL_INDEX} must hold a JSON object")
    return index


def present_components(folder: Path, index: dict[str, Any]) -> tuple[str, ...]:
    """Components the folder holds: all required ones, and optional ones not null in the index."""
    present = []
    for name in REQUIRED + OPTIONAL:
        entry = index.get(name)
        declared = isinstance(entry, list) and len(entry) == 2 and entry[0] is not None
        if name in OPTIONAL and not declared:
            if (folder / name).exists():
                logger.warning(
                    "%s: %s/ exists but %s does not declare it; ignored", folder, name, MODEL_INDEX
                )
            continue
        if not (folder / name / _config_file(name)).is_file():
            raise ModelLoadError(
                f"{folder}: component {name!r} is missing ({name}/{_config_file(name)} not found)"
            )
        present.append(name)
    return tuple(present)


def _config_file(name: str) -> str:
    return "scheduler_config.json" if name == "scheduler" else "config.json"


def load_components(folder: Path, torch_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Load every component of a model folder with its stock class; absent optional ones are None."""
    folder = Path(folder)
    index = read_model_index(folder)
    names = present_components(folder, index)
    components: dict[str, Any] = dict.fromkeys(REQUIRED + OPTIONAL)
    for name in names:
        try:
            components[name] = _load_one(folder / name, name, torch_dtype)
        except ModelLoadError:
            raise
        except Exception as e:  # the libraries raise OSError, ValueError, KeyError, safetensors errors...
            raise ModelLoadError(f"{folder}: cannot load component {name!r}: {type(e).__name__}: {e}") from e
    for name in WEIGHTED:
        module = components[name]
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return components


def _load_one(path: Path, name: str, torch_dtype: torch.dtype) -> Any:
    local = {"local_files_only": True}
    if name == "scheduler":
        return DPMSolverMultistepScheduler.from_pretrained(path, **local)
    if name == "transformer":
        # The published config says "SvdrrTransformer2DModel"; the weights are PixArt-Sigma keys.
        # use_additional_conditions must be False explicitly: left unset it turns on at sample_size 128.
        config = json.loads((path / "config.json").read_text())
        if config.get("use_additional_conditions") is None:
            logger.info("%s: use_additional_conditions unset in config; forcing False", path)
        return PixArtTransformer2DModel.from_pretrained(
            path, torch_dtype=torch_dtype, use_additional_conditions=False, **local
        )
    if name == "cc_projection":
        return CCProjection.from_pretrained(path, torch_dtype=torch_dtype, **local)
    if name == "vae":
        # fp16 SDXL-type VAEs overflow to NaN (config force_upcast): keep those in fp32.
        force_upcast = bool(json.loads((path / "config.json").read_text()).get("force_upcast", False))
        vae_dtype = torch.float32 if torch_dtype == torch.float16 and force_upcast else torch_dtype
        return AutoencoderKL.from_pretrained(path, torch_dtype=vae_dtype, **local)
    if name == "image_encoder":
        encoder = CLIPVisionModelWithProjection.from_pretrained(path, attn_implementation="sdpa", **local)
        return encoder.to(torch_dtype)
    raise ModelLoadError(f"unknown component {name!r}")


def save_components(folder: Path, components: dict[str, Any], diffusers_version: str) -> None:
    """Write components in the published layout (safetensors) with a model_index.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": "SvdrrPipeline", "_diffusers_version": diffusers_version}
    for name in REQUIRED + OPTIONAL:
        module = components.get(name)
        if module is None:
            if name in REQUIRED:
                raise ModelLoadError(f"cannot save {folder}: required component {name!r} is missing")
            index[name] = [None, None]
            continue
        if name == "scheduler":
            module.save_pretrained(folder / name)
        else:
            module.save_pretrained(folder / name, safe_serialization=True)
        index[name] = list(INDEX_CLASSES[name])
    tmp = folder / (MODEL_INDEX + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    os.replace(tmp, folder / MODEL_INDEX)
