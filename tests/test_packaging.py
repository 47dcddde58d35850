"""A wheel built from this tree carries every package and the demo model with its sample input, and
``model = "demo"`` finds the model inside the installed package, away from any checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "dicomnode", "synthesis", "storage", "models")
MODEL_FILES = (
    "demo/model_index.json",
    "demo/dicomnode-model.json",
    "demo/MODEL_CARD.md",
    "demo/recipe.json",
    "demo/transformer/config.json",
    "demo/transformer/diffusion_pytorch_model.safetensors",
    "demo/cc_projection/config.json",
    "demo/cc_projection/diffusion_pytorch_model.safetensors",
    "demo/scheduler/scheduler_config.json",
    "demo/sample/chest_pa_drr_phantom.dcm",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the sources (no build/ or egg-info left in the checkout)."""
    tree = tmp_path_factory.mktemp("tree")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        source = REPO / name
        shutil.copytree(source, tree / name, ignore=ignore) if source.is_dir() else shutil.copy2(source, tree / name)
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    result = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("dicomnode-*.whl")
    return built


def test_the_wheel_carries_every_package_and_the_demo_model(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    for file in MODEL_FILES:
        assert f"dicomnode_models/{file}" in names, file
        assert archive.getinfo(f"dicomnode_models/{file}").file_size == (REPO / "models" / file).stat().st_size
    assert "dicomnode_models/__init__.py" in names
    assert not any("/evaluation/" in n for n in names)  # the evaluation figures stay in the repository
    # pyproject lists its packages (models/ is mapped to dicomnode_models): none may be left out.
    for init in sorted(p for top in ("dicomnode", "synthesis", "storage") for p in (REPO / top).rglob("__init__.py")):
        assert init.relative_to(REPO).as_posix() in names, f"{init.parent.name} is missing from the wheel"
    for data in ("storage/migrations/env.py", "storage/migrations/alembic.ini", "storage/migrations/versions/0001"):
        assert any(n.startswith(data) for n in names), data


def test_demo_resolves_inside_the_installed_package(wheel: Path, tmp_path: Path) -> None:
    installed = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(installed)
    site = tmp_path / "anywhere"
    site.mkdir()
    (site / "site.toml").write_text('[node]\nstorage_dir = "var"\n\n[engine]\nmodel = "demo"\n', encoding="utf-8")
    script = (
        "import pathlib, dicomnode, dicomnode_models\n"
        "from dicomnode.config import load_settings\n"
        "s = load_settings(pathlib.Path('site.toml'), env={})\n"
        "print(dicomnode.__file__); print(s.engine.model); print(dicomnode_models.sample_path())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(installed)}
    run = [sys.executable, "-c", script]
    result = subprocess.run(run, cwd=site, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    module, model, sample = result.stdout.split()
    assert Path(module).is_relative_to(installed)  # the installed copy, not this checkout
    assert Path(model) == (installed / "dicomnode_models" / "demo").resolve()
    assert (Path(model) / "model_index.json").is_file() and Path(sample).is_file()
    check = [sys.executable, "-m", "dicomnode", "config", "check", "--config", "site.toml"]
    result = subprocess.run(check, cwd=site, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"model: {model} (found)" in result.stdout, result.stdout + result.stderr
