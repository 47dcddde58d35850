"""The identity of a model: a stable SHA-256 over its weights.

It is the key of provenance and of the DICOM Device UID of derived images (new weights, new UID),
so it must not depend on how the weights were serialised or on the dtype they were loaded in: it is
computed from the tensors as stored, in a canonical order (component, tensor name), hashing each
tensor's name, dtype, shape and raw bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from dicomnode.errors import ModelLoadError

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _update(h: hashlib._Hash, component: str, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().contiguous().cpu()
    h.update(f"{component}/{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}|".encode())
    h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def identity_of_modules(modules: Mapping[str, torch.nn.Module | None]) -> str:
    """Identity of components held in memory (a model being trained or built from configs)."""
    h = hashlib.sha256()
    for component in sorted(modules):
        module = modules[component]
        if module is None:
            continue
        state = module.state_dict()
        for name in sorted(state):
            _update(h, component, name, state[name])
    return h.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors if safetensors else sorted(folder.glob("*.bin"))


def _hash_component(h: hashlib._Hash, folder: Path, component: str, files: list[Path]) -> None:
    """Hash one component's tensors in name order, one tensor in memory at a time (safetensors)."""
    with contextlib.ExitStack() as stack:
        where: dict[str, object] = {}
        for path in files:
            try:
                if path.suffix == ".safetensors":
                    handle = stack.enter_context(safe_open(str(path), framework="pt"))
                    where.update({name: handle for name in handle.keys()})
                else:
                    where.update(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:  # a truncated or corrupt file: say which one
                raise ModelLoadError(f"{folder}: cannot read weights {path.relative_to(folder)}: {e}") from e
        for name in sorted(where):
            source = where[name]
            tensor = source if isinstance(source, torch.Tensor) else source.get_tensor(name)  # type: ignore[attr-defined]
            _update(h, component, name, tensor)


def identity_of_folder(folder: Path, components: Iterable[str]) -> str:
    """Identity of a checkpoint folder, equal to :func:`identity_of_modules` of what it holds."""
    entries: dict[str, list[Path]] = {}
    for component in components:
        files = _weight_files(folder / component)
        if not files:
            raise ModelLoadError(
                f"{folder}: component {component!r} has no weight file ({', '.join(WEIGHT_SUFFIXES)})"
            )
        entries[component] = files
    h = hashlib.sha256()
    for component in sorted(entries):
        _hash_component(h, folder, component, entries[component])
    return h.hexdigest()
