"""`multimodal-moe init uni-moe`: an untrained Uni-MoE model (and its processor) assembled from pretrained parts."""

from __future__ import annotations

import os

# ChatML without a default system prompt: SmolLM2's own template inserts a 20-token system message into every example.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_uni_moe(
    llm: str,
    vision: str | None = None,
    audio: str | None = None,
    num_experts: int = 4,
    top_k: int = 2,
    output_dir: str = "uni-moe",
    *,
    upcycle_noise: float = 0.0,
    dtype: str = "float32",
    audio_window_seconds: int | None = None,
    chat_template: str | None = None,
    **config_kwargs,
) -> str:
    """Upcycles the dense LLM `llm` into a Uni-MoE with `num_experts` experts (top-`top_k`), adds the vision / audio
    encoders, and saves model + processor to `output_dir` (loadable with `AutoModelForCausalLM` / `AutoProcessor`,
    with `trust_remote_code=True` where multimodal_moe is not installed). Returns `output_dir`.

    `llm`, `vision`, `audio`: zoo names (`smollm2-135m`, `dinov2-small`, `whisper-tiny-en`), local folders or Hub ids.
    `audio_window_seconds`: a Whisper window shorter than 30 s (feature extractor and encoder positions both cut).
    `chat_template`: the processor's chat template ("chatml": ChatML without a system prompt; default: the tokenizer's).
    `config_kwargs`: any other `UniMoEConfig` argument (connector types, moe_layers, loss coefficients...).
    """
    import torch
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

    from multimodal_moe.modeling import UniMoEForConditionalGeneration, UniMoEProcessor  # registers the Auto classes
    from multimodal_moe.training import zoo

    llm_path = zoo.resolve(llm)
    vision_path = zoo.resolve(vision) if vision else None
    audio_path = zoo.resolve(audio) if audio else None

    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    image_processor = AutoImageProcessor.from_pretrained(vision_path) if vision_path else None
    audio_kwargs = {"chunk_length": int(audio_window_seconds)} if audio_window_seconds else {}
    feature_extractor = AutoFeatureExtractor.from_pretrained(audio_path, **audio_kwargs) if audio_path else None
    if image_processor is not None and "vision_image_size" not in config_kwargs:
        # The encoder sees what the image processor outputs (DINOv2: crops 224 although its config says 518).
        config_kwargs["vision_image_size"] = _processed_image_size(image_processor)

    model = UniMoEForConditionalGeneration.from_pretrained_parts(
        llm_path,
        vision_path,
        audio_path,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        tokenizer=tokenizer,  # gets the <image> / <video> / <audio> tokens
        upcycle_noise=upcycle_noise,
        audio_window_seconds=audio_window_seconds,
        dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype,
        **config_kwargs,
    )
    if chat_template == "chatml":
        chat_template = CHATML_TEMPLATE
    processor = UniMoEProcessor(
        tokenizer,
        image_processor,
        feature_extractor,
        chat_template=chat_template,
        image_seq_length=model.config.image_seq_length,
        audio_seq_length=model.config.audio_seq_length,
    )
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def _processed_image_size(image_processor) -> int:
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop:
        return int(crop["height"])
    size = getattr(image_processor, "size", None) or {}
    for key in ("height", "shortest_edge"):
        if key in size:
            return int(size[key])
    raise ValueError(f"can't tell the image size {type(image_processor).__name__} produces")


__all__ = ["build_uni_moe"]
