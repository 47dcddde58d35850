"""The model folders shipped with dicomnode, installed as the package ``dicomnode_models``.

In a checkout this is the ``models/`` folder; a wheel carries it as package data, so that
``[engine] model = "demo"`` names the demonstration model wherever the configuration lives.
Only the files a node needs travel (weights, configs, ``dicomnode-model.json``, the model card and
the sample input); the evaluation figures stay in the repository.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: Model names a configuration may give instead of a path, each a folder of this package.
PACKAGED_MODELS: tuple[str, ...] = ("demo",)


def packaged_model_path(name: str) -> Path:
    """The folder of the packaged model ``name``; :class:`KeyError` when there is no such model."""
    if name not in PACKAGED_MODELS:
        raise KeyError(f"no packaged model {name!r} (packaged: {', '.join(PACKAGED_MODELS)})")
    return Path(str(files(__name__).joinpath(name)))


def demo_model_path() -> Path:
    """The folder of the shipped demonstration model (see ``demo/MODEL_CARD.md``)."""
    return packaged_model_path("demo")


def sample_path() -> Path:
    """The sample input of the README tour: a DX DRR of the phantom patient ``DEMO^PHANTOM``."""
    return demo_model_path() / "sample" / "chest_pa_drr_phantom.dcm"
