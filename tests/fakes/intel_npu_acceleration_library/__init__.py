"""FAKE intel_npu_acceleration_library for tests: mirrors the public API of the real 1.4.0 release.

The real library installs only on Windows here (win_amd64 wheels); this fake lets phi3's npu-lib adapter
be tested on any machine. It records how it is called (see ``_fake``) and runs its "NPU" layers on the CPU.
Unlike the real package, importing it does not patch torch (the real one calls enable_npu_device()).
"""

from ._version import __version__
from .compiler import compile
from .dtypes import float16, int4, int8
from .modelling import NPUModel, NPUModelForCausalLM

__all__ = ["compile", "int4", "int8", "float16", "__version__", "NPUModel", "NPUModelForCausalLM"]
