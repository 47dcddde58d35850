"""Tiny randomly initialised SV-DRR models saved in the published checkpoint layout (tests only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# What the published svdrr-dit-fb-* folders name in model_index.json and the transformer config.
PUBLISHED_INDEX: dict[str, Any] = {
    "_class_name": "SvdrrDiTPipeline",
    "_diffusers_version": "0.30.0",
    "cc_projection": ["pipeline_svdrr", "CCProjection"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "transformer": ["svdrr_transformer", "SvdrrTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


# A random model grounds nothing: its gate is opened on purpose (any input, threshold far below any
# score), so the plumbing tests run; the gate itself is tested with the real demo model.
TINY_META: dict[str, Any] = {
    "format": 1,
    "recommended": {"steps": 20, "guidance_scale": 3.0},
    "intended_inputs": {
        "modalities": None,
        "body_parts": None,
        "view_positions": None,
        "photometric_interpretations": None,
        "elevation_range": [-90, 90],
    },
    "gate": {"method": "denoise", "threshold": -1000.0, "calibration": {"data": "none: a random test model"}},
}


def make_tiny_model(folder: Path, resolution: int = 32, seed: int = 0, **arch: Any) -> Path:
    """Build, save and relabel a tiny model like a published checkpoint; returns the folder."""
    from synthesis import SvdrrPipeline
    from synthesis.architecture import build_components, tiny

    pipe = SvdrrPipeline(**build_components(tiny(resolution, **arch), seed=seed))
    pipe.save_pretrained(folder)
    index = dict(PUBLISHED_INDEX)
    for name in ("vae", "image_encoder"):
        if getattr(pipe, name) is None:
            index[name] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "SvdrrTransformer2DModel"
    config_path.write_text(json.dumps(config, indent=2))
    (folder / "dicomnode-model.json").write_text(json.dumps(TINY_META, indent=2))
    return folder
