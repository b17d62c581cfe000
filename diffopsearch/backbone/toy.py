"""The embedded default backbone: a small model of the real LLaVA classes.

``LlavaForConditionalGeneration`` with a CLIP vision tower (192 px, patch 16 -> 12 x 12 = 144 visual
tokens), LLaVA's two-layer GELU projector and an 8-layer Llama decoder; a word-level tokenizer built
with ``tokenizers``; ``LlavaProcessor`` with a LLaVA-1.5 style chat template. The trained weights
ship inside the package (``diffopsearch/assets/toy-llava``); ``build_*`` here make the same classes
with random weights, which is what the tests use.
"""
from __future__ import annotations

from pathlib import Path

from ..data import world

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy-llava"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
PROMPT_WORDS = "user assistant answer the question using a single word or phrase : . ?".split()
# LLaVA-1.5's conversation format, as llava-hf's chat template renders it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              image_size=world.IMAGE_SIZE, patch_size=world.CELL, projection_dim=128)
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=1e6,
            tie_word_embeddings=False)


def build_tokenizer():
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + sorted(set(world.vocabulary()) | set(PROMPT_WORDS))
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", model_max_length=512, extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer=None):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = world.IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(), patch_size=world.CELL,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token="<image>",
        num_additional_image_tokens=1,
    )


def build_config(tokenizer=None, vision: dict | None = None, text: dict | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tokenizer = tokenizer or build_tokenizer()
    v = CLIPVisionConfig(**{**VISION, **(vision or {})})
    t = LlamaConfig(**{**TEXT, **(text or {})}, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    n_tokens = (v.image_size // v.patch_size) ** 2
    return LlavaConfig(vision_config=v, text_config=t, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=-2, image_seq_length=n_tokens, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)


def build_model(seed: int = 0, vision: dict | None = None, text: dict | None = None):
    """A randomly initialised toy LLaVA (same classes as llava-hf's). ``vision``/``text`` override
    sizes, e.g. ``text={"num_hidden_layers": 4, "num_key_value_heads": 2}`` for a tiny GQA test model."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(vision=vision, text=text))
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    return model.eval()

