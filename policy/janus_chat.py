"""Janus-Pro's conversation format (DeepSeek's ``deepseek`` SFT template, what Janus-Pro was trained on):

    understanding   [<bos>] system "\\n\\n" "<|User|>: " <image> "\\n" question "\\n\\n" "<|Assistant|>:" " " answer
    generation      [<bos>] "<|User|>: " prompt "\\n\\n" "<|Assistant|>:" <begin_of_image> c_1 .. c_n

where ``<image>`` is the understanding slot ``<begin_of_image> <image_placeholder>*576 <end_of_image>`` (the
processor's expansion of one image). The text comes from the checkpoint's own chat template when its directory
has one (``tokenizer.chat_template``, ``chat_template.jinja`` / ``chat_template.json``), else from
:data:`JANUS_PRO_CHAT_TEMPLATE`, the same format written as a Jinja chat template. Messages follow the
transformers multimodal convention: ``content`` is a list of ``{"type": "image"}`` / ``{"type": "text"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Janus-Pro's default system prompt for understanding (its processor's ``DEFAULT_SYSTEM_PROMPT``)
JANUS_PRO_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

#: the DeepSeek format above; ``image_token`` (a render argument) marks where an image's slot goes
JANUS_PRO_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|User|>: ' }}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ image_token + '\n' }}{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '\n\n' }}"
    "{%- else -%}{{ '<|Assistant|>: ' }}"
    "{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}"
    "{{ '<\uff5cend\u2581of\u2581sentence\uff5c>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|Assistant|>:' }}{%- endif -%}"
)

DEFAULT_IMAGE_TOKEN = "<image_placeholder>"


def chat_template_of(tokenizer: Any, directory: str | Path | None = None) -> str:
    """The checkpoint's chat template (its tokenizer's, else its directory's ``chat_template.jinja`` or
    ``chat_template.json``), else Janus-Pro's format (:data:`JANUS_PRO_CHAT_TEMPLATE`)."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return own
    if directory is not None:
        d = Path(directory)
        if (d / "chat_template.jinja").is_file():
            return (d / "chat_template.jinja").read_text(encoding="utf-8")
        if (d / "chat_template.json").is_file():
            data = json.loads((d / "chat_template.json").read_text(encoding="utf-8"))
            if isinstance(data.get("chat_template"), str):
                return data["chat_template"]
    return JANUS_PRO_CHAT_TEMPLATE


def chat_ids(tokenizer: Any, template: str, user_text: str, *, image_slot: list[int] | None = None,
             image_token: str = DEFAULT_IMAGE_TOKEN, system: str | None = None) -> list[int]:
    """Token ids of one user turn and the assistant's opening (``add_generation_prompt``), rendered by
    ``template``; an image's ``image_token`` in the text becomes ``image_slot``. A tokenizer with a BOS token
    starts the sequence with it (as Janus's processor encodes)."""
    content: list[dict[str, str]] = ([{"type": "image"}] if image_slot is not None else [])
    content.append({"type": "text", "text": user_text})
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                         tokenize=False, image_token=image_token)
    pieces = text.split(image_token)
    if len(pieces) != (2 if image_slot is not None else 1):
        raise ValueError(f"chat template: expected {1 if image_slot is not None else 0} image(s) marked "
                         f"{image_token!r}, rendered {text!r}")
    bos = getattr(tokenizer, "bos_token_id", None)
    ids: list[int] = [int(bos)] if bos is not None else []
    for i, piece in enumerate(pieces):
        if i:
            ids += list(image_slot or [])
        ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


__all__ = ["DEFAULT_IMAGE_TOKEN", "JANUS_PRO_CHAT_TEMPLATE", "JANUS_PRO_SYSTEM_PROMPT", "chat_ids", "chat_template_of"]
