"""Where ``[engine] model`` points: a model shipped with the package, named, or a folder.

``model = "demo"`` -- a bare name, no slash, that is not a folder next to the configuration --
names a model shipped inside the package (``models/`` in a checkout, installed as the package
``dicomnode_models``), so a configuration copied anywhere still finds the demonstration model.
Anything else is a path, relative to the folder of the file that set it.

A configured folder that does not exist is an error of the configuration (``dicomnode config
check``, ``dicomnode serve``): the node never starts with a model path that names nothing. A folder
that exists but holds no ``model_index.json`` yet is a model still to come: the node receives,
stores and queues, and synthesis waits for it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

MODEL_INDEX = "model_index.json"
#: Names a configuration may give instead of a path (folders of the ``dicomnode_models`` package).
PACKAGED_MODEL_NAMES: tuple[str, ...] = ("demo",)
# In a checkout the package is the folder models/ beside dicomnode/ (installed as dicomnode_models).
_CHECKOUT_MODELS = Path(__file__).resolve().parent.parent / "models"


def packaged_model_folder(name: str) -> Path:
    """The folder of the packaged model ``name``: the checkout's ``models/<name>`` when this code runs
    from a checkout, else the installed ``dicomnode_models`` package's. KeyError for unknown names."""
    if name not in PACKAGED_MODEL_NAMES:
        raise KeyError(f"no packaged model {name!r} (packaged: {', '.join(PACKAGED_MODEL_NAMES)})")
    checkout = _CHECKOUT_MODELS / name
    if (_CHECKOUT_MODELS / "__init__.py").is_file() and (checkout / MODEL_INDEX).is_file():
        return checkout
    return Path(importlib.import_module("dicomnode_models").packaged_model_path(name)).resolve()


def is_model_name(value: str, base: Path) -> bool:
    """Whether ``value`` names a packaged model rather than a folder relative to ``base``."""
    return value in PACKAGED_MODEL_NAMES and not (base / value).exists()


def resolve_model(value: str | Path, base: Path) -> Path:
    """The model folder ``value`` means: a packaged model's by name, else ``value`` against ``base``."""
    text = str(value)
    if is_model_name(text, base):
        return packaged_model_folder(text)
    return (base / Path(text).expanduser()).resolve()


def model_path_error(folder: Path) -> str | None:
    """Why ``engine.model`` is a configuration error (the folder does not exist), or None."""
    if folder.is_dir():
        return None
    what = "is not a folder" if folder.exists() else "does not exist"
    names = ", ".join(f'"{n}"' for n in PACKAGED_MODEL_NAMES)
    return f"engine.model: model folder {folder} {what} (give an existing folder, or a packaged model: {names})"


def model_waiting_reason(folder: Path) -> str | None:
    """Why synthesis must wait for ``folder`` (missing, or no ``model_index.json`` yet), or None."""
    if not folder.is_dir():
        return f"model folder {folder} does not exist"
    if not (folder / MODEL_INDEX).is_file():
        return f"model folder {folder} has no {MODEL_INDEX} yet"
    return None
