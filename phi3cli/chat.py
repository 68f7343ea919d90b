"""A multi-turn conversation: history, system prompt, and trimming to the context window."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from phi3cli.backends.base import GenerationSettings, LoadedModel
from phi3cli.backends.vision import ImagePrompt, image_capacity, with_placeholders
from phi3cli.errors import ContextOverflowError
from phi3cli.generation import ReplyStats, TokenEvent, prompt_budget, stream_reply
from phi3cli.images import ImageLimits, check_count


@dataclass
class HistoryTrimmed:
    """Oldest turns were dropped so the conversation fits; never done silently."""

    messages: int  # how many messages (user and assistant turns) were dropped
    prompt_tokens: int


@dataclass
class ChatSession:
    """Messages so far; `ask` appends the user's turn and, when the reply completes, the assistant's.

    A user message may carry images (its "images" key, phi3cli.images.Image): those attached with `attach` go with
    the next message, and every later prompt renders them again at their place in the history.
    """

    model: LoadedModel
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    last_stats: ReplyStats | None = None
    pending_images: list = field(default_factory=list)  # phi3cli.images.Image, for the next message
    name: str = ""  # the model as the user named it, for messages
    image_limits: ImageLimits = field(default_factory=ImageLimits)  # what attach accepts

    @property
    def model_name(self) -> str:
        return self.name or self.model.path.name

    def reset(self) -> None:
        self.messages.clear()
        self.last_stats = None
        self.pending_images.clear()

    def attach(self, *images) -> None:
        """Send images (phi3cli.images.Image) with the next message; refused for a text-only model."""
        count = len(self.pending_images) + len(images)
        if images:
            check_count(count, self.model_name, image_capacity(self.model), self.image_limits)
        self.pending_images += images

    def fit(self, user_text: str) -> tuple[list[int], list[dict[str, str]]]:
        """Token ids of the next turn's prompt, and the history kept: oldest exchanges go first.

        A prompt fits when it is within the model's prompt budget and leaves room for a full reply
        (max_new_tokens); with no history left, fitting the budget is enough (the reply is shortened).
        """
        budget = prompt_budget(self.model)
        history = list(self.messages)
        while True:
            conversation = self.conversation_with(history, user_text, self.pending_images)
            messages, images = with_placeholders(conversation, self.model)
            text = self.model.chat_template.render(messages)
            ids = self.model.encode(text)
            if images:
                ids = ImagePrompt(ids, text, images)
            roomy = len(ids) + self.settings.max_new_tokens <= self.model.context_length
            too_many = len(images) > image_capacity(self.model)  # the oldest images go as old turns do
            if len(ids) <= budget and (roomy or not history) and not too_many:
                return ids, history
            if too_many and not history:
                check_count(len(images), self.model_name, image_capacity(self.model), self.image_limits)
            if not history:
                raise ContextOverflowError(
                    f"The message is {len(ids)} tokens with the system prompt; the model accepts {budget}.",
                    hint="Shorten the message or the system prompt.",
                )
            # Drop the oldest exchange: a user turn and the assistant turn that answered it.
            history = history[2:] if len(history) > 1 and history[1]["role"] == "assistant" else history[1:]

    def conversation_with(self, history: list[dict], user_text: str, images: list = ()) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + history + [{"role": "user", "content": user_text, **({"images": list(images)} if images else {})}]

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
                images = {"images": self.pending_images[:]} if self.pending_images else {}
                self.messages += [
                    {"role": "user", "content": user_text, **images},
                    {"role": "assistant", "content": event.text},
                ]
                self.pending_images.clear()
            yield event
