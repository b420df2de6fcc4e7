"""Building blocks: attention, dense MLP, mixture of experts, patch embedding."""

from .attention import Attention
from .mlp import Mlp
from .moe import MoE, MoEOutput, RoutingStats
from .patch_embed import PatchEmbed

__all__ = ["Attention", "Mlp", "MoE", "MoEOutput", "RoutingStats", "PatchEmbed"]
