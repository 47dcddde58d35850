"""Growing a pixel-space transformer's patch: the same tokens over an image ``factor`` times larger.

A pixel-space model trained at 64 px with patch 4 sees a 16 x 16 grid of tokens. The same grid at
128 px needs patch 8. :func:`grow_patch` builds that model from the trained one so that, before any
further training, it computes exactly what the small model computes: its patch embedding reads the
mean of each ``factor`` x ``factor`` block (the old kernel, each weight spread over the block and
divided by its area) and its output layer writes each old output pixel into the whole block (the
old rows repeated). The positional table keeps the old grid and scale. Training at the larger size
then only has to learn what lies inside a block: the cheap way to a 128 px model on a CPU, since
the token count, and so the cost of a step, stays that of the 64 px model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.errors import SynthesisError

if TYPE_CHECKING:
    from diffusers import PixArtTransformer2DModel


def grow_patch(transformer: PixArtTransformer2DModel, factor: int) -> PixArtTransformer2DModel:
    """``transformer`` with patch and sample size ``factor`` times larger, computing the same function.

    With x at the larger size: ``grown(x) == nearest_upsample(transformer(mean_pool(x)))`` (float
    rounding aside), for every timestep and conditioning token.
    """
    from diffusers import PixArtTransformer2DModel

    if factor == 1:
        return transformer
    if factor < 1:
        raise SynthesisError(f"the patch growth factor must be >= 1, got {factor}")
    config = dict(transformer.config)
    patch, size = int(config["patch_size"]), int(config["sample_size"])
    scale = config.get("interpolation_scale") or max(size // 64, 1)
    config.update(patch_size=patch * factor, sample_size=size * factor, interpolation_scale=scale)
    grown = PixArtTransformer2DModel.from_config(config)

    state = dict(transformer.state_dict())
    kernel = state["pos_embed.proj.weight"]  # [hidden, in, p, p]
    state["pos_embed.proj.weight"] = (
        kernel.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3) / factor**2
    )
    # proj_out rows are laid out (row in patch, column in patch, channel): see PixArt's unpatchify.
    out_channels = int(grown.out_channels)
    weight = state["proj_out.weight"]
    state["proj_out.weight"] = _repeat_rows(weight.reshape(patch, patch, out_channels, -1), factor).reshape(
        -1, weight.shape[-1]
    )
    bias = state["proj_out.bias"]
    state["proj_out.bias"] = _repeat_rows(bias.reshape(patch, patch, out_channels), factor).reshape(-1)
    grown.load_state_dict(state)
    return grown.to(kernel.device)


def _repeat_rows(table, factor: int):
    """Each (row, column) entry of a per-pixel table repeated into a ``factor`` x ``factor`` block."""
    return table.repeat_interleave(factor, dim=0).repeat_interleave(factor, dim=1).contiguous()
