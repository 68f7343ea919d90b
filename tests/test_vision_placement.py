"""Where the image tokens go: phi3's template + OpenVINO GenAI's VLMPipeline against transformers' own processor.

transformers' `Phi4MultimodalProcessor` writes one image token per image where the text has it and repeats it
`num_img_tokens` times (the crops of its HD transform, 256 tokens each after 2x2 compression, plus separators).
phi3 writes `<|image_N|>` before the turn's text; VLMPipeline splits the prompt at those tags, tokenizes the text
between them and puts each image's projected features at its tag (phi4mm's inputs embedder). For the tiny model
and images of several sizes (one to many crops), one and two images, in one turn and in two, these tests check:

- the processor's ids hold each image as one run of image tokens, after exactly the text tokens that phi3's
  prompt has before that image's tag;
- VLMPipeline fed phi3's prompt reads as many input tokens (its own perf metrics count text and image tokens)
  as the processor's ids hold, so each image takes as many tokens as transformers gives it;
- with one image, transformers' model on the processor's inputs and VLMPipeline on phi3's prompt give the same
  greedy tokens (a weak check on its own: the tiny random model's answer hardly depends on where the image sits,
  so it is the ids and counts above that would catch a misplaced image).

And, without transformers: VLMPipeline's own default placement (no tags in the prompt, its chat template on: it
writes `<|image_1|>`... before the user's text, then applies the template) gives the same input-token count and
greedy answer as phi3's explicit placement. Weak in the same way: a tag moved within the prompt keeps the count,
and the tiny model's answer barely moves with it.

The processor needs torchvision, which the project does not install in its environment (docs/vision.md says why):
these tests skip where it does not import, and scripts/test.sh runs them again with torchvision beside it. With PyPI's CUDA build of torchvision beside a CPU torch, tests/torchvision_ops.py
declares its missing C++ ops so the Python part imports (it changes no computation the processor does).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.test_vision import QUESTION
from tests.torchvision_ops import import_torchvision

pytestmark = pytest.mark.slow
# Before anything imports transformers: where torchvision is on the path but its C++ ops cannot load, declare them
# now, or transformers (which sees torchvision installed) fails to import optimum-intel's exporter later.
TORCHVISION = import_torchvision()
TAG = re.compile(r"<\|image_\d+\|>")
SIZES = [(90, 60), (448, 448), (1000, 500), (300, 900)]  # width x height: 1, 1, 2x1 and 1x3 crops (+ global)
NEW_TOKENS = 8


def picture(seed: int, width: int, height: int):
    from phi3cli.images import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image(f"p{seed}.png", width, height, "image/png", pixels)


@pytest.fixture(scope="module")
def transformers_side(tiny_multimodal):
    """transformers' processor (its fast image processor, from the tiny model's files) and its model."""
    torchvision, how = TORCHVISION
    if torchvision is None:
        pytest.skip(f"transformers' Phi-4-multimodal image processor needs torchvision: {how}")
    import torch
    from transformers import (
        AutoTokenizer,
        Phi4MultimodalFeatureExtractor,
        Phi4MultimodalForCausalLM,
        Phi4MultimodalImageProcessorFast,
        Phi4MultimodalProcessor,
    )

    # The image and audio tokens as the model's config names them (transformers' own checkpoints carry them in
    # the tokenizer's config; the tiny model's tokenizer is made and has only the tokens).
    tokenizer = AutoTokenizer.from_pretrained(
        tiny_multimodal, extra_special_tokens={"image_token": "<|endoftext10|>", "audio_token": "<|endoftext11|>"}
    )
    image_processor = Phi4MultimodalImageProcessorFast.from_pretrained(tiny_multimodal)
    processor = Phi4MultimodalProcessor(image_processor, Phi4MultimodalFeatureExtractor(), tokenizer)
    model = Phi4MultimodalForCausalLM.from_pretrained(tiny_multimodal).eval()
    with torch.no_grad():  # the weights as phi3's fp16 IR holds them, computed in f32 as VLMPipeline does here
        for weight in model.parameters():
            weight.copy_(weight.half().float())
    assert tokenizer.image_token_id == model.config.vision_config.image_token_id
    return processor, model


@pytest.fixture(scope="module")
def vision_model(tiny_multimodal, store):
    """phi3's fp16 conversion of the tiny model (nothing compressed), on VLMPipeline, f32 on the CPU."""
    from phi3cli.loading import load
    from phi3cli.routing import given

    model = load(tiny_multimodal, route=given("openvino", "cpu"), format="fp16", store=store)
    yield model
    model.close()


def phi3_reply(model, turns):
    """phi3's prompt for a conversation (turns: (text, images) for each user turn, answered "A square."), and the
    greedy reply to it with the input tokens VLMPipeline counted."""
    from phi3cli.backends.base import GenerationSettings
    from phi3cli.chat import ChatSession

    session = ChatSession(model, settings=GenerationSettings(max_new_tokens=NEW_TOKENS))
    for text, images in turns[:-1]:
        session.messages += [{"role": "user", "content": text, "images": images}]
        session.messages += [{"role": "assistant", "content": "A square."}]
    session.attach(*turns[-1][1])
    ids, _ = session.fit(turns[-1][0])
    reply = list(session.ask(turns[-1][0]))[-1]
    return ids, reply, model.last_perf.get_num_input_tokens()


def transformers_reply(transformers_side, prompt_text: str, images):
    """The processor's ids for phi3's prompt text with each `<|image_N|>` as the processor's image token, and
    transformers' greedy reply to them."""
    import torch
    from PIL import Image

    processor, model = transformers_side
    text = TAG.sub(processor.image_token, prompt_text)
    batch = processor(text=text, images=[Image.fromarray(i.pixels) for i in images], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    ids = batch["input_ids"][0].tolist()
    return ids, processor.tokenizer.decode(out[0, len(ids) :].tolist())


def check_against_processor(model, transformers_side, turns, answers: bool = True) -> list[int]:
    """The processor's ids equal phi3's prompt as VLMPipeline reads it (the text between the tags, tokenized, and
    each image's run of image tokens at its tag), and both runtimes answer alike: each image's token count."""
    prompt, reply, counted = phi3_reply(model, turns)
    ids, answer = transformers_reply(transformers_side, prompt.text, prompt.images)
    processor = transformers_side[0]
    lengths = [processor.image_processor(i.pixels)["num_img_tokens"][0] for i in prompt.images]
    assert len(lengths) == sum(len(images) for _, images in turns)
    expected: list[int] = []
    for n, piece in enumerate(TAG.split(prompt.text)):
        expected += model.encode(piece) if piece else []
        expected += [processor.image_token_id] * (lengths[n] if n < len(lengths) else 0)
    assert ids == expected
    assert counted == len(ids), f"VLMPipeline read {counted} input tokens, the processor wrote {len(ids)}"
    assert reply.input_tokens == counted  # what phi3's timing line shows as the prompt's size
    sizes = ", ".join(f"{i.width}x{i.height}" for i in prompt.images)
    print(f"\n{sizes}: processor {len(ids)} ids, image tokens {lengths}; VLMPipeline read {counted}")  # -s shows it
    if answers:
        assert reply.text == answer
    return lengths


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_one_image_goes_where_and_as_long_as_the_processor_says(vision_model, transformers_side, size):
    (length,) = check_against_processor(vision_model, transformers_side, [(QUESTION, [picture(1, *size)])])
    assert length > 256  # one crop's 256 tokens at least, plus the global view and separators


def test_two_images_in_one_turn_and_in_two_turns(vision_model, transformers_side):
    small, wide = picture(1, 90, 60), picture(2, 1000, 500)
    # Not the answers: transformers pads both images to the same crop count and runs them as one batch, and with
    # two images the tiny model's greedy margins are within that numerical difference (seen: 4 of 8 tokens).
    lengths = check_against_processor(vision_model, transformers_side, [("Compare these.", [small, wide])], False)
    assert lengths[0] < lengths[1]  # the wide image has more crops: the lengths are each image's own
    check_against_processor(
        vision_model, transformers_side, [("What is this?", [small]), ("And this one?", [wide])], False
    )


def runtime_default(model, text: str, images) -> tuple[str, int]:
    """VLMPipeline given the bare question and the images: it applies the chat template and places the tags."""
    import openvino as ov

    config = model.pipe.get_generation_config()
    config.max_new_tokens, config.apply_chat_template, config.do_sample = NEW_TOKENS, True, False
    tensors = [ov.Tensor(np.ascontiguousarray(i.pixels[None])) for i in images]
    result = model.pipe.generate(text, images=tensors, generation_config=config)
    return result.texts[0], result.perf_metrics.get_num_input_tokens()


@pytest.mark.parametrize("count", [1, 2])
def test_the_runtime_places_images_as_phi3_does(vision_model, count):
    images = [picture(1, 448, 448), picture(2, 300, 900)][:count]
    _, reply, counted = phi3_reply(vision_model, [(QUESTION, images)])
    assert runtime_default(vision_model, QUESTION, images) == (reply.text, counted)
