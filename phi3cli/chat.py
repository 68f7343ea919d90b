"""A multi-turn conversation: history, system prompt, and trimming to the context window."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from phi3cli.backends.base import GenerationSettings, LoadedModel
from phi3cli.errors import ContextOverflowError
from phi3cli.generation import ReplyStats, TokenEvent, prompt_budget, stream_reply


@dataclass
class HistoryTrimmed:
    """Oldest turns were dropped so the conversation fits; never done silently."""

    messages: int  # how many messages (user and assistant turns) were dropped
    prompt_tokens: int


@dataclass
class ChatSession:
    """Messages so far; `ask` appends the user's turn and, when the reply completes, the assistant's."""

    model: LoadedModel
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    last_stats: ReplyStats | None = None

    def reset(self) -> None:
        self.messages.clear()
        self.last_stats = None

    def fit(self, user_text: str) -> tuple[list[int], list[dict[str, str]]]:
        """Token ids of the next turn's prompt, and the history kept: oldest exchanges go first.

        A prompt fits when it is within the model's prompt budget and leaves room for a full reply
        (max_new_tokens); with no history left, fitting the budget is enough (the reply is shortened).
        """
        budget = prompt_budget(self.model)
        history = list(self.messages)
        while True:
            ids = self.model.encode(self.model.chat_template.render(self.conversation_with(history, user_text)))
            roomy = len(ids) + self.settings.max_new_tokens <= self.model.context_length
            if len(ids) <= budget and (roomy or not history):
                return ids, history
            if not history:
                raise ContextOverflowError(
                    f"The message is {len(ids)} tokens with the system prompt; the model accepts {budget}.",
                    hint="Shorten the message or the system prompt.",
                )
            # Drop the oldest exchange: a user turn and the assistant turn that answered it.
            history = history[2:] if len(history) > 1 and history[1]["role"] == "assistant" else history[1:]

    def conversation_with(self, history: list[dict[str, str]], user_text: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + history + [{"role": "user", "content": user_text}]

    def ask(self, user_text: str) -> Iterator[TokenEvent | ReplyStats | HistoryTrimmed]:
        """Stream the reply to a user message; history keeps the turn only if the reply finished."""
        ids, kept = self.fit(user_text)
        if len(kept) < len(self.messages):
            dropped = len(self.messages) - len(kept)
            self.messages[:] = kept
            yield HistoryTrimmed(dropped, len(ids))
        for event in stream_reply(self.model, ids, self.settings):
            if isinstance(event, ReplyStats):
                self.last_stats = event
                self.messages += [
                    {"role": "user", "content": user_text},
                    {"role": "assistant", "content": event.text},
                ]
            yield event
