"""dsray: expert-parallel DeepSeek-V3-style MoE training and inference on Ray."""

from dsray.config import PRESETS, ModelConfig, preset

__version__ = "0.1.0"
__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "Engine", "__version__"]


def __getattr__(name: str):
    # Lazy: `import dsray` stays cheap and does not pull in torch models or ray until asked.
    if name == "Transformer":
        from dsray.model import Transformer

        return Transformer
    if name == "Engine":
        from dsray.runtime.engine import Engine

        return Engine
    raise AttributeError(name)
