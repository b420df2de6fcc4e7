"""WideNet: Go Wider Instead of Deeper (Xue et al., AAAI 2022) in PyTorch.

The names below are imported on first use (PEP 562), so `import widenet` and the
command line's entry point load torch only when something needs it: Ctrl-C while
torch loads is then the command line's to report (widenet/__main__.py).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_HOME = {
    "Pretrained": "inference", "from_pretrained": "inference", "load_pretrained": "inference",
    "save_pretrained": "inference",
    "MoE": "layers.moe", "MoEOutput": "layers.moe", "RoutingStats": "layers.moe",
    "dropless_routing": "layers.moe",
    "Encoder": "models", "EncoderConfig": "models", "TextConfig": "models", "TextOutput": "models",
    "TextTransformer": "models", "VisionConfig": "models", "VisionTransformer": "models",
    "count_parameters": "models", "create_model": "models", "list_models": "models", "model_config": "models",
    "load_hf": "models.hf", "upcycle": "models.upcycle",
}

__all__ = ["MoE", "MoEOutput", "RoutingStats", "Encoder", "EncoderConfig", "Pretrained", "TextConfig", "TextOutput",
           "TextTransformer", "VisionConfig", "VisionTransformer", "count_parameters", "create_model",
           "dropless_routing", "from_pretrained", "list_models", "load_hf", "load_pretrained", "model_config",
           "save_pretrained", "upcycle", "__version__"]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports these
    from .inference import Pretrained, from_pretrained, load_pretrained, save_pretrained
    from .layers.moe import MoE, MoEOutput, RoutingStats, dropless_routing
    from .models import (Encoder, EncoderConfig, TextConfig, TextOutput, TextTransformer, VisionConfig,
                         VisionTransformer, count_parameters, create_model, list_models, model_config)
    from .models.hf import load_hf
    from .models.upcycle import upcycle


def __getattr__(name: str) -> Any:
    """A public name from its module, or a subpackage (widenet.models) imported on first use."""
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
