"""Phi-4-multimodal on OpenVINO: exporting its submodels to the layout VLMPipeline reads, and running them.

Export (see docs/vision.md for why this route): optimum-intel 1.27 has Phi-4-multimodal's export config but caps
transformers at 4.53.3. Lifted for this one config, its export runs on transformers 4.57 once the vision
encoder returns its hidden states again (4.57 collects them with hooks that optimum's patched forward skips):
`_vision_export_fixes` does both, for the duration of the export only. The folder then holds
openvino_language_model, openvino_text_embeddings_model, openvino_vision_embeddings_model and
openvino_vision_projection_model IRs (and the audio ones, which phi3 does not use), config.json carrying the image
separators (sub_GN, glb_GN), and its model_type is written as OpenVINO GenAI names it ("phi4mm"). The language
model is compressed as the text recipe says (data-free), the other submodels to int8 (symmetric, channel-wise),
as optimum-intel does for vision-language models.

Running: VLMPipeline takes the prompt as text, with `<|image_N|>` where image N goes, and the images as tensors.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from phi3cli.backends.base import GenerationSettings, LoadRequest, RawToken
from phi3cli.backends.openvino import SPEC
from phi3cli.backends.openvino.ir import TOKENIZER_FILES, VISION_MARKER
from phi3cli.backends.openvino.runtime import (
    OpenVINOModel,
    TokenStreamer,
    _compile_log,
    compile_properties,
    execution_devices,
    ov_device_for,
)
from phi3cli.backends.streaming import IncrementalDecoder, pull_from_push
from phi3cli.backends.vision import ImagePrompt
from phi3cli.errors import ConversionError, Phi3Error
from phi3cli.progress import Progress
from phi3cli.remote_code import remote_code_files
from phi3cli.util import first_line, log_softmax

LANGUAGE_MODEL = "openvino_language_model"
# model_type in the Hugging Face config -> the name OpenVINO GenAI's VLMPipeline knows it by
GENAI_MODEL_TYPES = {"phi4_multimodal": "phi4mm", "phi3_v": "phi3_v"}
MAX_IMAGES = 8  # per request: each 448x448 crop is 256 tokens, and a large image is up to 36 crops


def is_vision_ir(folder: Path) -> bool:
    return (folder / VISION_MARKER).is_file()


def is_vision_config(config: dict) -> bool:
    return config.get("model_type") in GENAI_MODEL_TYPES


@contextlib.contextmanager
def _transformers_cap_lifted(config_class) -> Iterator[None]:
    """optimum-intel 1.27 caps its vision export configs at transformers 4.53.3: lifted up to 4.57.x, for one export."""
    cap = config_class.MAX_TRANSFORMERS_VERSION
    config_class.MAX_TRANSFORMERS_VERSION = "4.57.99"
    try:
        yield
    finally:
        config_class.MAX_TRANSFORMERS_VERSION = cap


@contextlib.contextmanager
def _vision_export_fixes(model_type: str) -> Iterator[None]:
    """optimum-intel 1.27's export of this model type on transformers 4.57, for the duration of one export.

    Phi-3.5-vision: the cap only (its own code does the rest; never run here, see docs/vision.md).
    """
    from optimum.exporters.openvino import model_configs

    if model_type == "phi3_v":
        with _transformers_cap_lifted(model_configs.Phi3VisionOpenVINOConfig):
            yield
        return
    from transformers.modeling_outputs import BaseModelOutput
    from transformers.models.phi4_multimodal import modeling_phi4_multimodal as phi4

    def encoder_forward(self, inputs_embeds, attention_mask=None, **_):
        hidden = inputs_embeds
        states = [hidden]
        for layer in self.layers:
            hidden = layer(hidden, attention_mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            states.append(hidden)
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=tuple(states))

    forward = phi4.Phi4MultimodalVisionEncoder.forward
    phi4.Phi4MultimodalVisionEncoder.forward = encoder_forward
    try:
        with _transformers_cap_lifted(model_configs.Phi4MMOpenVINOConfig):
            yield
    finally:
        phi4.Phi4MultimodalVisionEncoder.forward = forward


def export_vision(
    hf_dir: Path, out: Path, settings: dict[str, Any] | None, progress: Progress, trust_remote_code: bool = False
) -> None:
    """Export a vision-language folder to VLMPipeline's layout in out, compressed as settings say (None: fp16).

    Phi-3.5-vision runs the checkpoint's own code, so only with trust_remote_code, and says so before it starts.
    """
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    from phi3cli.backends.openvino.export import _quiet_converters, _raise_if_disk_full

    config = json.loads((hf_dir / "config.json").read_text())
    model_type = config["model_type"]
    remote = model_type in SPEC.remote_code_types  # Phi-3.5-vision: exported only when trusted
    if remote:
        if not trust_remote_code:
            raise ConversionError(
                f"{hf_dir} runs only with the modelling code it ships; phi3 runs it only when asked.",
                hint="Add --trust-remote-code to `phi3 convert` if you trust that code.",
            )
        files = remote_code_files(config, hf_dir, hf_dir.name)
        progress.note(
            f"The export runs the code {hf_dir.name} ships ({', '.join(files)}), as --trust-remote-code asks."
        )
    progress.phase(f"Exporting {hf_dir.name} (language model, text embeddings, vision encoder, projection)")
    try:
        with _quiet_converters(), _vision_export_fixes(model_type):
            main_export(
                str(hf_dir),
                output=out,
                task="image-text-to-text",
                ov_config=OVConfig(dtype="fp16"),
                library_name="transformers",
                local_files_only=True,
                trust_remote_code=remote,
            )
    except (RuntimeError, ValueError, TypeError, AttributeError, ImportError, OSError) as exc:
        _raise_if_disk_full(exc, out)
        raise ConversionError(f"optimum-intel could not export {hf_dir} for images: {first_line(exc)}") from exc
    config_path = out / "config.json"
    written = json.loads(config_path.read_text())
    written["model_type"] = GENAI_MODEL_TYPES[written["model_type"]]
    config_path.write_text(json.dumps(written, indent=2))
    if settings is not None:
        _compress_submodels(out, settings, progress)


def _compress_submodels(out: Path, settings: dict[str, Any], progress: Progress) -> None:
    import nncf

    from phi3cli.backends.nncf_weights import nncf_progress
    from phi3cli.backends.openvino.export import _quiet_converters
    from phi3cli.backends.openvino.recipe import describe_recipe

    data_free = {k: v for k, v in settings.items() if k in ("bits", "sym", "group_size", "ratio")}
    if settings.get("dataset") is not None:
        progress.note("The vision model's language model is compressed data-free (no calibration for images yet).")
    progress.phase(f"Compressing the language model with NNCF ({describe_recipe(data_free)}), the rest to int8")
    for xml in sorted(out.glob("openvino_*_model.xml")):
        if xml.name in TOKENIZER_FILES:
            continue
        if xml.stem == LANGUAGE_MODEL:
            kind = f"INT{data_free['bits']}_{'SYM' if data_free['sym'] else 'ASYM'}"
            options: dict[str, Any] = {"mode": getattr(nncf.CompressWeightsMode, kind)}
            if data_free["bits"] == 4:
                options.update(group_size=data_free["group_size"], ratio=data_free["ratio"])
        else:
            options = {"mode": nncf.CompressWeightsMode.INT8_SYM}
        staged = xml.with_name(xml.stem + ".compressed.xml")
        with _quiet_converters(), nncf_progress(progress):
            model = nncf.compress_weights(ov.Core().read_model(xml), **options)
            ov.save_model(model, staged, compress_to_fp16=False)
        del model
        staged.replace(xml)
        staged.with_suffix(".bin").replace(xml.with_suffix(".bin"))


class VisionModel(OpenVINOModel):
    """A vision-language IR on VLMPipeline: prompts as text with image placeholders, images as tensors."""

    max_images = MAX_IMAGES
    serial_reason = "one request at a time: OpenVINO GenAI's VLMPipeline"

    placeholder = "<|image_{}|>"  # Phi-4-multimodal's; Phi-3.5-vision's ends with a newline

    def image_placeholder(self, number: int) -> str:
        return self.placeholder.format(number)

    def constraint_refusal(self) -> str | None:
        return "phi3 does not constrain a vision model's output yet"

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[RawToken]:
        config = self.generation_config(settings)
        decoder = IncrementalDecoder(self.decode, self.decode_pair)
        if isinstance(prompt_ids, ImagePrompt):
            text, images = prompt_ids.text, prompt_ids.images
        else:
            text, images = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=False), []
        tensors = [ov.Tensor(np.ascontiguousarray(image.pixels[None])) for image in images]

        def produce(emit: Callable[[RawToken], bool]) -> None:
            streamer = TokenStreamer(decoder, emit)
            result = self.pipe.generate(text, images=tensors, generation_config=config, streamer=streamer)
            self.last_perf = result.perf_metrics
            if isinstance(prompt_ids, ImagePrompt):
                encoding = result.perf_metrics.get_vision_encoding_duration().mean  # ms, 0 without images
                prompt_ids.image_seconds = encoding / 1000 if images else None
                prompt_ids.input_tokens = result.perf_metrics.get_num_input_tokens()  # image tokens included

        return pull_from_push(produce)

    def next_token_logprobs(self, ids: list[int]) -> np.ndarray:
        """Text only: the text embeddings model, then the language model over them, with a fresh KV state."""
        if self._scorer is None:
            core = ov.Core()
            embed = core.compile_model(str(self.path / "openvino_text_embeddings_model.xml"), "CPU")
            language = core.compile_model(str(self.path / "openvino_language_model.xml"), "CPU", self.scorer_properties)
            self._scorer = (embed, language)
        embed, language = self._scorer
        embeds = embed.create_infer_request().infer({0: np.array([ids], dtype=np.int64)})[0]
        request = language.create_infer_request()
        request.reset_state()
        n = len(ids)
        inputs = {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None, :],
            "beam_idx": np.zeros(1, dtype=np.int32),
        }
        names = {p.get_any_name() for p in language.inputs}
        return log_softmax(request.infer({k: v for k, v in inputs.items() if k in names})["logits"][0, :-1])


def load_vision(folder: Path, fmt: str, request: LoadRequest, progress: Progress) -> VisionModel:
    """Compile a vision-language IR folder into a VLMPipeline on the device asked."""
    from phi3cli.backends.openvino.ir import context_length

    device = ov_device_for(request.device, list(ov.Core().available_devices))
    properties = compile_properties(request)
    progress.phase(f"Loading {folder.name} on {device} with OpenVINO GenAI (VLMPipeline)")
    try:
        with _compile_log() as log:
            pipe = ov_genai.VLMPipeline(str(folder), device, **properties)
            # One token of warm-up inside the captured log: GenAI's first generate logs a line of its own (its
            # visual-token pruner's SIMD) on stdout, which would otherwise land in the answer a pipe reads.
            warm = pipe.get_generation_config()
            warm.max_new_tokens = 1
            pipe.generate("Hi", generation_config=warm)
    except RuntimeError as exc:
        raise Phi3Error(
            f"OpenVINO GenAI could not load the vision model {folder} on {device}: {first_line(exc)}",
            hint="Run again with --debug for OpenVINO's full message.",
        ) from exc
    executed = execution_devices(log) or device
    model = VisionModel(folder, pipe, fmt, request.device, executed, context_length(folder), None, reuse=False)
    model.prompt_cache = None  # VLMPipeline reads every prompt whole
    if _model_type(folder) == "phi3_v":  # a ready-made Phi-3.5-vision IR (as OpenVINO GenAI's docs write it)
        model.placeholder = "<|image_{}|>\n"
    return model


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
