"""WideNet: Go Wider Instead of Deeper (Xue et al., AAAI 2022) in PyTorch."""

from .inference import Pretrained, from_pretrained, load_pretrained
from .layers.moe import MoE, MoEOutput, RoutingStats
from .models import (Encoder, EncoderConfig, TextConfig, TextOutput, TextTransformer, VisionConfig,
                     VisionTransformer, count_parameters, create_model, list_models, model_config)
from .models.hf import load_hf
from .models.upcycle import upcycle

__version__ = "0.1.0"

__all__ = ["MoE", "MoEOutput", "RoutingStats", "Encoder", "EncoderConfig", "Pretrained", "TextConfig", "TextOutput",
           "TextTransformer", "VisionConfig", "VisionTransformer", "count_parameters", "create_model",
           "from_pretrained", "list_models", "load_hf", "load_pretrained", "model_config", "upcycle", "__version__"]
