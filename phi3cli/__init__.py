"""phi3: run Microsoft Phi-3 models on AI PCs and ordinary machines."""

__version__ = "0.1.0"

# The model every command uses when none is named.
DEFAULT_MODEL = "microsoft/Phi-3-mini-4k-instruct"
