"""A test backbone of LLaVA-1.5-7B's exact shape except its widths (issue 16).

What matters for the visual token count, the reduction sites and the search's memory is LLaVA-1.5-7B's:

- CLIP ViT at 336 px with patch 14: a 24 x 24 grid, 576 patch tokens + CLS; LLaVA's feature layer -2 and
  the ``default`` strategy (CLS dropped), so 576 visual tokens enter the LLM, as in
  ``llava-hf/llava-1.5-7b-hf``;
- LLaVA's projector (two linear layers with GELU);
- a 32-layer Llama decoder (multi-head attention, Hkv = H, as Vicuna-7B);
- a ``LlavaProcessor`` that resizes / crops to 336 px with CLIP's normalisation, inserts 576 ``<image>``
  tokens and renders LLaVA-1.5's prompt (``USER: <image>\\n... ASSISTANT:``, the toy's chat template).

Only the widths are small (decoder d = 64, CLIP d = 32 with 3 layers), so the model runs on a CPU in
seconds: random weights, the real ``transformers`` classes, saved with ``save_pretrained`` into a directory
that ``load_backbone`` / ``model.path=DIR`` read like any llava-hf checkpoint. The tokenizer is the toy
world's word-level one (so the toy world's questions are whole words), with a 4096-token limit.

``seven_b_config()`` is the real ``llava-hf/llava-1.5-7b-hf`` config (tests/fixtures/llava-1.5-7b-hf.config.json)
as a ``LlavaConfig``: plans are validated and costed against it.

Used by tests/test_real_shape.py, scripts/real_size.py and scripts/gpu_check.py; not a user model.
"""
from __future__ import annotations

import json
from pathlib import Path

FIXTURE_7B = Path(__file__).resolve().parent / "fixtures" / "llava-1.5-7b-hf.config.json"

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH          # 24
N_VISUAL = GRID * GRID              # 576
NUM_LAYERS = 32

# CLIP: 3 layers, so feature layer -2 is the output of layer 1 (a CLIP layer to read CLS attention from).
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
# Decoder: 32 layers, d = 64 (4 heads of 16), MLP 172 (11008 / 4096 of d), multi-head attention.
TEXT = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False)
MODEL_MAX_LENGTH = 4096


def build_tokenizer():
    from diffopsearch.backbone import toy

    tok = toy.build_tokenizer()
    tok.model_max_length = MODEL_MAX_LENGTH  # 576 image tokens + the prompt exceed the toy's 512
    return tok


def build_processor(tokenizer=None):
    """LLaVA-1.5's processor at 336 px: shortest edge 336, centre crop 336 x 336, CLIP mean / std, patch 14,
    ``default`` strategy (576 image tokens per image), LLaVA-1.5's chat template."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from diffopsearch.backbone import toy

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, image_mean=toy.CLIP_MEAN, image_std=toy.CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(), patch_size=PATCH,
        vision_feature_select_strategy="default", chat_template=toy.CHAT_TEMPLATE, image_token="<image>",
        num_additional_image_tokens=1,
    )


def build_model(seed: int = 0, text: dict | None = None, vision: dict | None = None, initializer_range: float = 0.5):
    """The random real-shape LLaVA (eval mode, float32). ``text`` / ``vision`` override sizes (e.g. a wider
    decoder for a measurement); ``initializer_range`` 0.5 so answers depend on the image and question (with
    the default 0.02 a random model says the same words whatever it is asked)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from diffopsearch.backbone import toy

    init = {"initializer_range": initializer_range}
    cfg = toy.build_config(tokenizer=build_tokenizer(), vision={**VISION, **init, **(vision or {})},
                           text={**TEXT, **init, **(text or {})})
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    return model.eval()


def build_real_shape(directory, seed: int = 0, text: dict | None = None, vision: dict | None = None) -> Path:
    """Save the real-shape model and its processor into ``directory`` (``model.path=DIR``); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = build_model(seed, text=text, vision=vision)
    check_shape(model.config)
    model.save_pretrained(directory)
    build_processor().save_pretrained(directory)
    return directory


def check_shape(config) -> None:
    """Raise AssertionError unless ``config`` has LLaVA-1.5-7B's token geometry and depth."""
    from diffopsearch.evaluate import visual_token_count

    n, grid = visual_token_count(config)
    assert (n, tuple(grid)) == (N_VISUAL, (GRID, GRID)), (n, grid)
    assert config.text_config.num_hidden_layers == NUM_LAYERS
    assert config.vision_config.image_size == IMAGE_SIZE and config.vision_config.patch_size == PATCH
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.projector_hidden_act == "gelu"


def seven_b_dict() -> dict:
    return json.loads(FIXTURE_7B.read_text())


def seven_b_config():
    """``llava-hf/llava-1.5-7b-hf``'s config (the fixture) as a LlavaConfig (no weights)."""
    from transformers import LlavaConfig

    return LlavaConfig(**seven_b_dict())
