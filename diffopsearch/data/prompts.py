"""The evaluation prompt: lmms-eval's GQA / VQAv2 post-prompt inside the backbone's chat template."""
from __future__ import annotations

POST_PROMPT = "\nAnswer the question using a single word or phrase."


def format_prompt(question: str, processor) -> str:
    """``USER: <image>\\n{question}\\nAnswer the question using a single word or phrase. ASSISTANT:``
    for LLaVA-1.5; whatever the processor's own chat template makes of the same message otherwise."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + POST_PROMPT}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)
