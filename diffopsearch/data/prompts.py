"""The evaluation prompt: lmms-eval's GQA / VQAv2 post-prompt inside the backbone's chat template."""
from __future__ import annotations

POST_PROMPT = "\nAnswer the question using a single word or phrase."


def format_context(text: str, processor, n_images: int = 1, answer: str | None = None) -> str:
    """``text`` as one user turn after ``n_images`` images, in the processor's chat template, with the
    generation prompt (LLaVA-1.5: ``USER: <image>\\n{text} ASSISTANT:``); with ``answer``, followed by
    that assistant turn instead (what a log-likelihood scores). A ``text`` that already holds the
    image placeholders (lmms-eval contexts sometimes do) is used as it is."""
    image_token = getattr(processor, "image_token", None) or "<image>"
    content = [] if image_token in text else [{"type": "image"}] * n_images
    messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, add_generation_prompt=answer is None)


def format_prompt(question: str, processor) -> str:
    """``USER: <image>\\n{question}\\nAnswer the question using a single word or phrase. ASSISTANT:``
    for LLaVA-1.5; whatever the processor's own chat template makes of the same message otherwise."""
    return format_context(question + POST_PROMPT, processor)
