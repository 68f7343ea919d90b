"""Chat templates, rendered the way transformers renders them, without importing transformers.

Every backend renders prompts through this one module, so the same conversation becomes the
same token ids whichever runtime runs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path

# Phi-3-mini-4k-instruct's own template, for folders that carry none.
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def _token_text(value) -> str:
    if isinstance(value, dict):
        return value.get("content", "")
    return value or ""


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with the special tokens it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    @cached_property
    def _compiled(self):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.source)

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        return self._compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


def load_chat_template(folder: Path) -> ChatTemplate:
    """The chat template a model folder carries (chat_template.jinja or tokenizer_config.json)."""
    config: dict = {}
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        pass
    source = None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        source = jinja.read_text()
    elif isinstance(config.get("chat_template"), str):
        source = config["chat_template"]
    elif isinstance(config.get("chat_template"), list):
        named = {t.get("name"): t.get("template") for t in config["chat_template"]}
        source = named.get("default") or next(iter(named.values()), None)
    return ChatTemplate(
        source=source or PHI3_TEMPLATE,
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
    )
