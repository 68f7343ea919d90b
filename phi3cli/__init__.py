"""phi3: run Microsoft Phi-3 models on AI PCs and ordinary machines."""

__version__ = "0.1.0"

# The model every command uses when none is named: a name in phi3's catalogue (phi3cli/data/catalog.json), which
# runs a ready-made variant of microsoft/Phi-3-mini-4k-instruct where one fits the device.
DEFAULT_MODEL = "phi-3-mini"
