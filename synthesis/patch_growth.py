"""Growing a pixel-space transformer's patch: the same tokens over an image ``factor`` times larger.

A pixel-space model trained at 64 px with patch 4 sees a 16 x 16 grid of tokens. The same grid at
128 px needs patch 8. :func:`grow_patch` builds that model from the trained one so that, before any
further training, it computes exactly what the small model computes: its patch embedding reads the
mean of each ``factor`` x ``factor`` block (the old kernel, each weight spread over the block and
divided by its area) and its output layer writes each old output pixel into the whole block (the
old rows repeated). The positional table keeps the old grid and scale. Training at the larger size
then only has to learn what lies inside a block: the cheap way to a 128 px model on a CPU, since
the token count, and so the cost of a step, stays that of the 64 px model.

That exact copy is a saddle point: with every block's weights equal, no gradient can make the
pixels of a block differ (the output layer passes back only block sums of the error, and the block
sums are blind to differences inside a block), so a 64 px model grown without more stays a blocky
one (measured: the v-prediction loss stayed at 0.24 for 700 steps). ``jitter`` breaks the
symmetry with seeded noise that has a zero sum over every block, in the embedding kernel and in
the output layer: an image constant on blocks still gets exactly the small model's answer, in
block means, while differences inside blocks now reach the tokens and the error inside blocks
reaches the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.errors import SynthesisError

if TYPE_CHECKING:
    from diffusers import PixArtTransformer2DModel


def grow_patch(
    transformer: PixArtTransformer2DModel, factor: int, *, jitter: float = 0.0, seed: int = 0
) -> PixArtTransformer2DModel:
    """``transformer`` with patch and sample size ``factor`` times larger, computing the same function.

    With x at the larger size and ``jitter`` 0: ``grown(x) == nearest_upsample(transformer(mean_pool(x)))``
    (float rounding aside), for every timestep and conditioning token. With ``jitter`` > 0 (a
    fraction of each layer's weight RMS), that holds in block means for x constant on blocks.
    """
    import torch
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
    state["pos_embed.proj.weight"] = _repeat_pixels(kernel, factor, (2, 3)) / factor**2
    # proj_out rows are laid out (row in patch, column in patch, channel): see PixArt's unpatchify.
    out_channels = int(grown.out_channels)
    weight = state["proj_out.weight"]
    state["proj_out.weight"] = _repeat_pixels(weight.reshape(patch, patch, out_channels, -1), factor, (0, 1)).reshape(
        -1, weight.shape[-1]
    )
    bias = state["proj_out.bias"]
    state["proj_out.bias"] = _repeat_pixels(bias.reshape(patch, patch, out_channels), factor, (0, 1)).reshape(-1)
    if jitter < 0:
        raise SynthesisError(f"jitter is a fraction >= 0 of the weights' RMS, got {jitter}")
    if jitter > 0:
        generator = torch.Generator().manual_seed(seed)
        big = patch * factor
        kernel = state["pos_embed.proj.weight"]  # blocks along the last two (pixel) axes
        state["pos_embed.proj.weight"] = kernel + _zero_block_sum_noise(kernel, factor, jitter, generator)
        weight = state["proj_out.weight"].reshape(big, big, out_channels, -1).permute(2, 3, 0, 1)
        weight = weight + _zero_block_sum_noise(weight, factor, jitter, generator)
        state["proj_out.weight"] = weight.permute(2, 3, 0, 1).reshape(-1, weight.shape[1])
    grown.load_state_dict(state)
    return grown.to(kernel.device)


def _repeat_pixels(table, factor: int, axes: tuple[int, int]):  # noqa: ANN001, ANN202
    """Each entry along the two pixel ``axes`` (row, column) repeated into a ``factor`` x ``factor`` block."""
    return table.repeat_interleave(factor, dim=axes[0]).repeat_interleave(factor, dim=axes[1]).contiguous()


def _zero_block_sum_noise(table, factor: int, jitter: float, generator):  # noqa: ANN001, ANN202
    """Gaussian noise shaped like ``table`` (pixels on the last two axes), ``jitter`` x its RMS,
    minus its mean over every ``factor`` x ``factor`` block of pixels."""
    import torch
    import torch.nn.functional as F

    rms = table.pow(2).mean().sqrt()
    noise = torch.randn(tuple(table.shape), generator=generator, dtype=torch.float32) * (jitter * rms)
    flat = noise.reshape(-1, 1, *table.shape[-2:])
    means = F.avg_pool2d(flat, factor).repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return (flat - means).reshape(table.shape).to(table.dtype)
