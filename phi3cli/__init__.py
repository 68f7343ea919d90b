"""phi3: run Microsoft Phi-3 models on AI PCs and ordinary machines."""

__version__ = "0.1.0"
