"""render_chat against transformers' apply_chat_template (the reference), on random conversations.

Run: uv run pytest -q phase1_foundation/project2_tokenizer/test_chat_template.py
"""

from __future__ import annotations

import random

import pytest

from course.errors import CourseError
from phase1_foundation.project2_tokenizer.chat_template import render_chat

# Qwen2.5-style ChatML: a default system message when the conversation has none.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# meta-llama/Llama-2-7b-chat-hf: <<SYS>> folded into the first user turn, roles must alternate.
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# TinyLlama/TinyLlama-1.1B-Chat-v1.0 (Zephyr style), with its newlines and whitespace control.
TINYLLAMA = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
             "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
             "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
             "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
             "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# The environment's extras: namespace, loop controls, tojson (no HTML escaping), the {% generation %} tag.
EXTRAS = ("{% set ns = namespace(n=0) %}{%- for m in messages -%}{% if m.role == 'system' %}{% continue %}{% endif %}"
          "{% set ns.n = ns.n + 1 %}{{ m | tojson }}\n"
          "{% if m.role == 'assistant' %}{% generation %}{{ m.content | trim }}{% endgeneration %}{% endif %}"
          "{%- endfor %}[{{ ns.n }}]{{ bos_token }}{% if add_generation_prompt %}>{% endif %}")
TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2, "tinyllama": TINYLLAMA, "extras": EXTRAS}
BOS, EOS = "<s>", "</s>"


def random_text(rng: random.Random) -> str:
    pieces = ["hello", "world", " ", "  ", "\n", "\n\n", "<b>&amp;</b>", '"quoted"', "{{ not jinja }}", "é", "日本",
              "🙂", "[INST]", "it's", "\t", "42"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))


def random_conversation(rng: random.Random, system: bool) -> list[dict]:
    """Alternating user/assistant turns (the Llama-2 template requires it), ending on a user turn."""
    turns = rng.randint(0, 3)
    messages = [{"role": "system", "content": random_text(rng)}] if system else []
    for _ in range(turns):
        messages += [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
    if rng.random() < 0.8:
        messages.append({"role": "user", "content": random_text(rng)})
    return messages or [{"role": "user", "content": random_text(rng)}]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A transformers tokenizer built locally from a tiny `tokenizers` object (no network, no files)."""
    pytest.importorskip("transformers", reason="transformers (dev group) is the reference")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, BOS: 1, EOS: 2, "a": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token="<unk>")


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("seed", range(8))
def test_render_chat_equals_transformers(hf_tokenizer, name, seed):
    rng = random.Random(1000 * seed + len(name))
    for system in (False, True):
        messages = random_conversation(rng, system)
        for gen in (True, False):
            theirs = hf_tokenizer.apply_chat_template(messages, chat_template=TEMPLATES[name], tokenize=False,
                                                      add_generation_prompt=gen)
            ours = render_chat(TEMPLATES[name], messages, bos_token=BOS, eos_token=EOS, add_generation_prompt=gen)
            assert ours == theirs, (name, messages, gen)


def test_render_chat_known_strings():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}]
    assert render_chat(LLAMA2, msgs, bos_token=BOS, eos_token=EOS) == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST]"
    assert render_chat(TINYLLAMA, msgs[1:], eos_token=EOS) == "<|user|>\n Hi </s>\n<|assistant|>\n"
    assert render_chat(CHATML, msgs[1:], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n")


def test_render_chat_errors(hf_tokenizer):
    bad_roles = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        hf_tokenizer.apply_chat_template(bad_roles, chat_template=LLAMA2, tokenize=False)
    with pytest.raises(CourseError, match="chat template: Conversation roles must alternate"):
        render_chat(LLAMA2, bad_roles)
    with pytest.raises(CourseError, match="not valid Jinja"):
        render_chat("{% for m in messages %}", bad_roles)
    with pytest.raises(CourseError, match="list of dicts"):
        render_chat(CHATML, "hello")
    with pytest.raises(CourseError, match="chat template string"):
        render_chat("", bad_roles)
    # the sandbox: a template cannot reach Python internals
    with pytest.raises(CourseError, match="could not render"):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", bad_roles)


# ---- run as a script: validation examples ----------------------------------------------------------------
def _demo() -> None:
    conversation = [{"role": "user", "content": "What is BPE?"},
                    {"role": "assistant", "content": "Byte pair encoding."}, {"role": "user", "content": "Thanks!"}]
    for name, template in (("ChatML (Qwen2.5)", CHATML), ("LLaMA 2 chat", LLAMA2), ("TinyLlama (Zephyr)", TINYLLAMA)):
        print(f"--- {name} ---")
        print(render_chat(template, conversation, bos_token="<s>", eos_token="</s>"))
    print("--- (the tests compare each with transformers' apply_chat_template on random conversations)")


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(_demo, __doc__)
