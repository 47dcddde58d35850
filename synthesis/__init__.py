"""The SV-DRR engine: a view-conditioned DiT on stock diffusers classes.

torch and diffusers load lazily on first attribute access, so ``import synthesis`` stays cheap.
"""

from typing import Any

__all__ = ["CCProjection", "SvdrrPipeline", "SvdrrPipelineOutput"]


def __getattr__(name: str) -> Any:
    if name in ("SvdrrPipeline", "SvdrrPipelineOutput"):
        from synthesis import pipeline

        return getattr(pipeline, name)
    if name == "CCProjection":
        from synthesis.projection import CCProjection

        return CCProjection
    raise AttributeError(f"module 'synthesis' has no attribute {name!r}")
