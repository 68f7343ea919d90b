"""A backend in one file, registered from outside phi3 through the `phi3cli.backends` entry point.

tests/test_plugin_backend.py installs it (a dist-info folder naming `toy = tests.toy_backend:SPEC`) and drives
`phi3 devices`, `phi3 chat` and `phi3 bench` with it. It is a real runtime, not a fake: a hand-written greedy
decode loop over a transformers model with its KV cache (no generate()), so its answers are the model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from phi3cli.backends import BackendSpec
from phi3cli.backends.base import Backend, GenerationSettings, LoadedModel, LoadRequest, RawToken
from phi3cli.backends.streaming import IncrementalDecoder
from phi3cli.progress import Progress
from phi3cli.templates import load_chat_template

SPEC = BackendSpec(
    name="toy",
    factory="tests.toy_backend:ToyBackend",
    extra="torch",
    requires=("torch", "transformers"),
    devices=("cpu",),
    formats=("fp32",),
    description="a greedy decode loop over transformers, written in one file",
    preference=(("cpu", 99),),
    probe_label="the toy backend (always the CPU)",
    libraries=("torch", "transformers"),
)


class ToyModel(LoadedModel):
    backend = "toy"

    def __init__(self, folder: Path, device: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.path, self.device, self.executed_device, self.format = folder, device, "CPU", "fp32"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.context_length = int(self.model.config.max_position_embeddings)
        self.chat_template = load_chat_template(folder)
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[RawToken]:
        torch = self.torch
        decoder = IncrementalDecoder(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
        ids, past = torch.tensor([prompt_ids]), None
        with torch.inference_mode():
            for _ in range(settings.max_new_tokens):
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = int(out.logits[0, -1].argmax())
                if token in self.eos and not settings.ignore_eos:
                    return
                yield RawToken(decoder.push(token), token_id=token)
                ids = torch.tensor([[token]])

    def close(self) -> None:
        self.model = None


class ToyBackend(Backend):
    def load(self, folder: Path, request: LoadRequest, progress: Progress) -> LoadedModel:
        progress.phase(f"Loading {folder.name} with the toy loop")
        return ToyModel(folder, request.device)
