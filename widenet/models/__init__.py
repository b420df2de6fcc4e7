"""Encoder with sharing, vision models, and the preset registry."""

from . import presets  # noqa: F401  (registers the presets)
from .encoder import Encoder, EncoderConfig, EncoderOutput
from .registry import count_parameters, create_model, list_models, model_config, register_model
from .vision import VisionConfig, VisionOutput, VisionTransformer

__all__ = ["Encoder", "EncoderConfig", "EncoderOutput", "VisionConfig", "VisionOutput",
           "VisionTransformer", "count_parameters", "create_model", "list_models",
           "model_config", "register_model"]
