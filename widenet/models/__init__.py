"""Encoder with sharing, vision and text models, and the preset registry."""

from . import presets, text_presets  # noqa: F401  (registers the presets)
from .encoder import Encoder, EncoderConfig, EncoderOutput
from .registry import count_parameters, create_model, list_models, model_config, register_model
from .text import TextConfig, TextOutput, TextTransformer
from .vision import VisionConfig, VisionOutput, VisionTransformer

__all__ = ["Encoder", "EncoderConfig", "EncoderOutput", "TextConfig", "TextOutput", "TextTransformer",
           "VisionConfig", "VisionOutput", "VisionTransformer", "count_parameters", "create_model",
           "list_models", "model_config", "register_model"]
