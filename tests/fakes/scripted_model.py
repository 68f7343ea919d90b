"""A FAKE of a loaded model: it replays scripted replies token by token, as llm's MockModel does.

FakeScriptedModel honours the LoadedModel interface (phi3cli/backends/base.py), so the code that drives a model
(stream_reply, chat sessions, serve's queue and protocol, rendering, bookkeeping) is tested in milliseconds, without
the demo model. It says nothing about any runtime: its "tokenizer" gives one id per character, and it answers
whatever the test queued (else an echo of the last user message). Tests of what a real runtime does use the real
demo model and are marked slow.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from phi3cli.backends import BackendSpec
from phi3cli.backends.base import Backend, GenerationSettings, LoadedModel, LoadRequest, RawToken
from phi3cli.backends.streaming import pull_from_push
from phi3cli.progress import Progress
from phi3cli.templates import PHI3_TEMPLATE, ChatTemplate

FILLER = " more"  # what the fake says past its reply when ignore_eos asks it to go on
_LAST_USER = re.compile(r"<\|user\|>\n(.*?)<\|end\|>", re.S)


def echo(prompt: str) -> str:
    """The fake's reply when nothing is queued: the last user message of a chat prompt, else the prompt's end."""
    asked = _LAST_USER.findall(prompt)
    return f"You said: {asked[-1] if asked else prompt[-40:]}"


def pieces(reply: str) -> list[str]:
    """A reply cut into tokens as a tokenizer would: each word with the space before it."""
    return re.findall(r"\s*\S+|\s+$", reply)


class FakeScriptedModel(LoadedModel):
    """A FAKE LoadedModel: replays queued replies (or echoes), one RawToken per word, through pull_from_push.

    Everything it was asked is kept for assertions: `prompts` (the token ids of each generate) and `settings`.
    token_delay slows each token down, so a test can stop a reply half way.
    """

    backend = "fake"

    def __init__(
        self,
        replies: Iterable[str] = (),
        *,
        context_length: int = 4096,
        token_delay: float = 0.0,
        default: Callable[[str], str] = echo,
        executed_device: str = "CPU",
    ):
        self.queue: deque[str] = deque(replies)
        self.default = default
        self.context_length = context_length
        self.token_delay = token_delay
        self.device, self.executed_device, self.format = "cpu", executed_device, "fake"
        self.path = Path("fake-model")
        self.chat_template = ChatTemplate(PHI3_TEMPLATE, eos_token="<|endoftext|>")
        self.prompts: list[list[int]] = []
        self.settings: list[GenerationSettings] = []
        self.vocabulary: dict[str, int] = {}
        self.stopped = threading.Event()  # set when a consumer closed a reply before its end
        self.closed = False
        self._lock = threading.Lock()

    def script(self, *replies: str) -> None:
        """Queue the next replies, in order."""
        self.queue.extend(replies)

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    @staticmethod
    def decode(ids: list[int]) -> str:
        return "".join(map(chr, ids))

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[RawToken]:
        with self._lock:  # serve's batched workers may call it from several threads
            self.prompts.append(prompt_ids if hasattr(prompt_ids, "images") else list(prompt_ids))  # an ImagePrompt
            self.settings.append(settings)
            reply = self.queue.popleft() if self.queue else self.default(self.decode(prompt_ids))
        words = pieces(reply)

        def produce(emit: Callable[[RawToken], bool]) -> None:
            for i in range(settings.max_new_tokens):
                if i >= len(words) and not settings.ignore_eos:
                    return
                word = words[i] if i < len(words) else FILLER
                if self.token_delay:
                    time.sleep(self.token_delay)
                token_id = self.vocabulary.setdefault(word, 1000 + len(self.vocabulary))
                if not emit(RawToken(word, token_id=token_id)):
                    self.stopped.set()
                    return

        return pull_from_push(produce)

    def close(self) -> None:
        self.closed = True


# A FAKE backend around it, for tests that drive phi3's loading path (or a plugin registration) without a runtime.
SPEC = BackendSpec(
    name="fake",
    factory="tests.fakes.scripted_model:FakeScriptedBackend",
    extra="test",
    requires=(),
    devices=("cpu",),
    formats=("fake",),
    description="a FAKE backend that replays scripted replies (tests only)",
    preference=(("cpu", 999),),
    auto=False,
)
CONFIG = {  # a config.json that resolves as a Phi-3 model folder (its shape is the demo model's)
    "model_type": "phi3",
    "architectures": ["Phi3ForCausalLM"],
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "max_position_embeddings": 8192,
}
BLOB = "fake-compiled.blob"  # what the fake "runtime" keeps in LoadRequest.cache_dir, as OpenVINO keeps compiled models


def write_fake_model(folder: Path, config: dict | None = None) -> Path:
    """A folder that resolves as a Hugging Face Phi-3 model (a config, no weights): the FAKE backend loads it; with
    config, that config.json (what the checks before a conversion or a load read)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    return folder


class FakeScriptedBackend(Backend):
    """A FAKE Backend: loads a FakeScriptedModel, and records every LoadRequest and what its cache held then."""

    loads: list[tuple[LoadRequest, bool]] = []  # (request, whether request.cache_dir held a blob at load)

    def load(self, folder: Path, request: LoadRequest, progress: Progress) -> LoadedModel:
        held = bool(request.cache_dir and (Path(request.cache_dir) / BLOB).is_file())
        if request.cache_dir:
            Path(request.cache_dir).mkdir(parents=True, exist_ok=True)
            (Path(request.cache_dir) / BLOB).write_text("compiled")
        FakeScriptedBackend.loads.append((request, held))
        model = FakeScriptedModel(context_length=CONFIG["max_position_embeddings"])
        model.path, model.device, model.format = folder, request.device, request.format or "fake"
        return model
