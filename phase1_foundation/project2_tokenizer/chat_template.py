"""Chat templates: turn a conversation (a list of {"role", "content"} messages) into the one string a chat
model was trained on, the way Hugging Face transformers' `tokenizer.apply_chat_template(..., tokenize=False)`
does.

PAPERS / FORMATS
- Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT):
  a chat model sees a conversation as one token sequence with role markers; at inference the same markers
  must frame the prompt, or the model sees text unlike anything it was tuned on.
- OpenAI ChatML (2023): `<|im_start|>role\\ncontent<|im_end|>`; Touvron et al. 2023, "Llama 2": `[INST]`,
  `<<SYS>>`; Tunstall et al. 2023, "Zephyr" (TinyLlama-Chat): `<|user|>`, `<|assistant|>`.
- Hugging Face "Chat templates" (transformers docs): each checkpoint ships its format as a Jinja template in
  `tokenizer_config.json` (or `chat_template.jinja`), rendered with `messages`, `add_generation_prompt` and
  the special token strings.

INTUITION: the format is data, not code: the checkpoint says how its conversations look, so one renderer
serves every model. A template from the Hub is untrusted text, so it is rendered in Jinja's immutable sandbox.

IMPLEMENTATION: the environment transformers builds (trim_blocks, lstrip_blocks, loop controls, the
`raise_exception` / `strftime_now` globals, its `tojson` that does not escape HTML, and the
`{% generation %}` tag, which here renders its body unchanged), with `tools` and `documents` set to None as
transformers passes them. Not covered: tool schemas, documents, continue_final_message, assistant masks.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from course.errors import CourseError


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise CourseError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # WHY not Jinja's own tojson: it escapes <, >, & for HTML, which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise CourseError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def render_chat(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face chat template for `messages`, exactly as transformers' apply_chat_template.

    bos_token / eos_token: the special token *strings* ("<s>", "</s>", "<|im_end|>") the template may
    insert; the caller encodes the result with its tokenizer, allowing special tokens.
    add_generation_prompt: end with the opening of an assistant turn, so the model writes the reply.
    """
    if not isinstance(template, str) or not template:
        raise CourseError("render_chat needs a chat template string (chat_template in tokenizer_config.json)")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise CourseError("messages must be a list of dicts like {'role': 'user', 'content': 'hi'}")
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as e:
        raise CourseError(f"could not render the chat template ({type(e).__name__}: {e})") from None
