"""WideNet: Go Wider Instead of Deeper (Xue et al., AAAI 2022) in PyTorch."""

from .layers.moe import MoE, MoEOutput, RoutingStats
from .models import (Encoder, EncoderConfig, TextConfig, TextOutput, TextTransformer, VisionConfig,
                     VisionTransformer, count_parameters, create_model, list_models, model_config)

__version__ = "0.1.0"

__all__ = ["MoE", "MoEOutput", "RoutingStats", "Encoder", "EncoderConfig", "TextConfig", "TextOutput",
           "TextTransformer", "VisionConfig", "VisionTransformer", "count_parameters", "create_model",
           "list_models", "model_config", "__version__"]
