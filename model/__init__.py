"""DeepSeek-V2/V3-style models in plain single-device PyTorch (no distributed code, no Hydra)."""

from .config import ModelConfig, load_preset
from .transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "load_preset"]
