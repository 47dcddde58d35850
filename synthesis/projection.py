"""The one non-stock component of SV-DRR: the projection of [CLIP embedding | pose] to one token.

Stored in a checkpoint's ``cc_projection/`` folder with config keys ``in_channel`` and
``out_channel`` and the linear layer under the attribute name ``projection`` (so its weights are
``projection.weight`` / ``projection.bias``), exactly as the published checkpoints have it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

POSE_CHANNELS = 4


class CCProjection(ModelMixin, ConfigMixin):
    """``nn.Linear(in_channel, out_channel)``: 772 -> 1152 in the published models."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channel: int = 772, out_channel: int = 1152):
        super().__init__()
        if in_channel < POSE_CHANNELS or out_channel < 1:
            raise ValueError(
                f"CCProjection: in_channel must be >= 4 and out_channel >= 1, got {in_channel}, {out_channel}"
            )
        self.projection = nn.Linear(in_channel, out_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Training start (spec): the embedding block is the identity, the rest and the bias zero.

        With in_channel = E + 4 the top-left E x E block becomes I, so at step 0 the token is the
        CLIP embedding itself (zero-padded when out_channel > E) and the pose columns start at zero.
        """
        self.projection.weight.zero_()
        self.projection.bias.zero_()
        n = min(self.config.in_channel - POSE_CHANNELS, self.config.out_channel)
        if n > 0:
            self.projection.weight[:n, :n] = torch.eye(n)
