"""FAKE intel_npu_acceleration_library.modelling: NPUModel and NPUModelForCausalLM, as in the real 1.4.0.

Same signature and flow as the real from_pretrained: load with the transformers class, compile(), and with
``export=True`` (the default) torch.save the whole model under ./cache/models and torch.load it next time
(an unpickled object, which recent torch refuses by default). phi3 passes ``export=False``.
"""

from __future__ import annotations

import hashlib
import os
from functools import partialmethod
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import intel_npu_acceleration_library as npu_lib
from intel_npu_acceleration_library import _fake
from intel_npu_acceleration_library.compiler import CompilerConfig


def get_model_path(model_name: str, *args: Any, **kwargs: Any) -> tuple[str, str]:
    arguments = f"{[str(a) for a in args] + [f'{k}_{v}' for k, v in kwargs.items()]}"
    digest = hashlib.sha256(arguments.encode("utf-8")).hexdigest()
    mangled = f"{model_name}_{digest}_{npu_lib.__version__}".replace("\\", "_").replace("/", "_")
    model_dir = os.path.join("cache", "models", mangled)
    return model_dir, os.path.join(model_dir, "pytorch_npu_model.pt")


class NPUModel:
    """Base NPU model class (FAKE mirror)."""

    @staticmethod
    def from_pretrained(
        model_name_or_path: str,
        config: CompilerConfig,
        transformers_class: type | None = None,
        export=True,
        *args: Any,
        **kwargs: Any,
    ) -> torch.nn.Module:
        _fake.record("NPUModel.from_pretrained", model_name_or_path, config=config, export=export, **kwargs)
        if transformers_class is None:
            raise RuntimeError(f"Invalid transformer class {type(transformers_class)}")
        model_dir, model_path = get_model_path(model_name_or_path, config.dtype, config.training, *args, **kwargs)
        if os.path.isdir(model_dir) and os.path.isfile(model_path):
            return torch.load(model_path)
        print(f"Compiling model {model_name_or_path} {config.dtype} for the NPU")
        model = transformers_class.from_pretrained(model_name_or_path, *args, **kwargs)
        model = npu_lib.compile(model, config)
        if export:
            if kwargs.get("trust_remote_code", False):
                raise AttributeError(
                    "Cannot export model with trust_remote_code=True. Please set trust_remote_code=False or export=False"
                )
            os.makedirs(model_dir, exist_ok=True)
            torch.save(model, model_path)
        return model


class NPUModelForCausalLM:
    """NPU wrapper for AutoModelForCausalLM (FAKE mirror)."""

    from_pretrained = partialmethod(NPUModel.from_pretrained, transformers_class=AutoModelForCausalLM)
