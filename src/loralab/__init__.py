"""loralab: honest, reproducible LoRA studies."""

__version__ = "0.1.0"
