"""Janus-Pro's chat template (policy/janus_chat.py): generation prompts and the GvU understanding scorer are
Janus-Pro conversations; a Janus directory's own template is the one used."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from policy.factory import build_policy
from policy.janus import JanusPolicy
from policy.janus_chat import JANUS_PRO_CHAT_TEMPLATE, JANUS_PRO_SYSTEM_PROMPT
from reward.gvu import INSTRUCTION, _sequences, gvu_scores

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def janus() -> JanusPolicy:
    return JanusPolicy.from_tiny(seed=0)


def _enc(j: JanusPolicy, text: str) -> list[int]:
    return j.tokenizer.encode(text, add_special_tokens=False)


def test_generation_prompt_is_a_janus_pro_conversation(janus):
    ids = janus.generation_prompt("a red circle")
    assert ids == _enc(janus, "<|User|>: a red circle\n\n<|Assistant|>:") + [janus.token_ids["img_start"]]
    assert janus.chat_template == JANUS_PRO_CHAT_TEMPLATE  # the tiny tokenizer has none of its own


def test_understanding_prompt_holds_the_image_slot_and_the_system_prompt(janus):
    t, n = janus.token_ids, janus.n_understanding_tokens
    ids = janus.understanding_prompt(INSTRUCTION)
    slot = [t["img_start"], *[t["img"]] * n, t["img_end"]]
    expected = (_enc(janus, JANUS_PRO_SYSTEM_PROMPT + "\n\n<|User|>: ") + slot
                + _enc(janus, "\n" + INSTRUCTION + "\n\n<|Assistant|>:"))
    assert ids == expected and ids.count(t["img"]) == n


def test_gvu_scorer_reads_the_description_as_the_assistants_answer(janus):
    rows, starts = _sequences(janus, ["a red circle", "two blue squares"], INSTRUCTION)
    prefix = janus.understanding_prompt(INSTRUCTION)
    for row, start, d in zip(rows, starts, ["a red circle", "two blue squares"]):
        assert row[:start] == prefix and row[start:] == _enc(janus, " " + d)
    pixels = torch.rand(2, 3, 16, 16)
    scores = gvu_scores(janus, janus.understanding_pixels(pixels), ["a red circle", "two blue squares"])
    ids = torch.tensor([rows[0]])
    with torch.no_grad():
        logp, _ = janus.token_logprobs(ids, torch.ones_like(ids), janus.understanding_pixels(pixels[:1]))
    assert scores[0].item() == pytest.approx(math.exp(logp[0, starts[0]:].mean().item()), rel=1e-5)
    assert all(0 < s <= 1 for s in scores.tolist())


CUSTOM = ("{%- for message in messages -%}{%- if message['role'] == 'user' -%}{{ 'USER: ' }}"
          "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}<image_placeholder>"
          "{%- else -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}")


def test_a_janus_directorys_chat_template_is_used(janus, tmp_path):
    janus.save_pretrained(tmp_path / "default")
    assert (tmp_path / "default" / "chat_template.jinja").read_text() == JANUS_PRO_CHAT_TEMPLATE
    again = build_policy({"arch": "janus", "janus_path": str(tmp_path / "default")})
    assert again.generation_prompt("a red circle") == janus.generation_prompt("a red circle")
    custom = JanusPolicy(janus.model, copy.deepcopy(janus.tokenizer), chat_template=CUSTOM)
    custom.save_pretrained(tmp_path / "custom")
    loaded = build_policy({"arch": "janus", "janus_path": str(tmp_path / "custom")})
    assert loaded.chat_template == CUSTOM
    assert loaded.generation_prompt("a red circle") == (_enc(loaded, "USER: a red circle ASSISTANT:")
                                                        + [loaded.token_ids["img_start"]])
    slot = loaded.understanding_prompt("Describe the image", system=None)
    assert slot.count(loaded.token_ids["img"]) == loaded.n_understanding_tokens
