"""Checking a schema with XGrammar before it joins a continuous batch.

OpenVINO GenAI 2026.4 compiles a request's grammar inside ContinuousBatchingPipeline.step(): a schema XGrammar
refuses there fails the step for every running request and leaves the pipeline unusable ("cannot be called when we
are already in scheduling phase" at the next step). So each new schema is first compiled on a pipeline of its own
(the same IR on the CPU, loaded on first need, generating one token), and only schemas that compiled join the batch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from phi3cli.backends.base import GenerationSettings
from phi3cli.backends.openvino.runtime import grammar_errors

MAX_REMEMBERED = 256  # schemas known to compile; past this the set starts again


class GrammarCheck:
    """Compiles each new constraint once, off the batch, raising ConstraintError with XGrammar's reason."""

    def __init__(self, folder: Path, properties: dict[str, Any]):
        self.folder = folder
        self.properties = {**properties, "ATTENTION_BACKEND": "SDPA", "INFERENCE_NUM_THREADS": 1}
        self._pipe = None
        self._lock = threading.Lock()
        self._compiled: set[str] = set()
        self.checked = 0  # schemas compiled by the check (for /health)

    def check(self, settings: GenerationSettings) -> None:
        if settings.constraint is None:
            return
        text = settings.constraint.schema_text
        with self._lock:
            if text in self._compiled:
                return
            if self._pipe is None:
                self._pipe = ov_genai.LLMPipeline(str(self.folder), "CPU", **self.properties)
            config = self._pipe.get_generation_config()
            config.max_new_tokens = 1
            config.apply_chat_template = False
            config.structured_output_config = ov_genai.StructuredOutputConfig(json_schema=text)
            with grammar_errors(settings):
                self._pipe.generate(ov.Tensor(np.array([[0]], dtype=np.int64)), config)
            if len(self._compiled) >= MAX_REMEMBERED:
                self._compiled.clear()
            self._compiled.add(text)
            self.checked += 1

    def close(self) -> None:
        self._pipe = None
