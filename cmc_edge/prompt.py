"""Prompt formats: render a conversation with a model's Jinja chat template (no transformers needed).

Training renders the delta's view of a prompt with this module and the runtime renders it the
same way, so the delta sees at decode time exactly the text layout it was trained on.

>>> fmt = PromptFormat(chat_template=None)
>>> render_prompt(fmt, [{"role": "user", "content": "Hi"}])
'User: Hi\\nAssistant:'
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cmc_edge.errors import InputError

# Used when a GGUF carries no chat template (e.g. Gemma 3 270M base). Measured on Gemma 3 270M base
# (bench/probe_baseline.py): capital-question recall 0.60 with this question/answer layout versus
# 0.00 with Gemma's own turn markers, which the base model was not trained to follow.
QA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Answer: ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"
)
QA_STOP = ("\n",)


@dataclass(frozen=True)
class PromptFormat:
    """How to lay out a conversation as text: a Jinja chat template (or None for a plain layout),
    an optional default system prompt, the text that closes an assistant turn, extra stop strings."""

    chat_template: str | None
    system_prompt: str | None = None
    end_of_turn: str = ""
    stop: tuple[str, ...] = ()          # extra stop strings a layout needs (a base model's QA layout)

    def to_dict(self) -> dict:
        return {"chat_template": self.chat_template, "system_prompt": self.system_prompt,
                "end_of_turn": self.end_of_turn, "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptFormat":
        return cls(chat_template=d.get("chat_template"), system_prompt=d.get("system_prompt"),
                   end_of_turn=d.get("end_of_turn") or "", stop=tuple(d.get("stop") or ()))


def _raise(msg):
    raise InputError(f"the chat template refused the conversation: {msg}",
                     fix="check the roles and their order, or pass --chat-template")


def render_prompt(fmt: PromptFormat, messages: list[dict], system: str | None = None) -> str:
    """The prompt text (everything before the assistant's answer) in ``fmt``'s layout."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    msgs = list(messages)
    sys_prompt = system if system is not None else fmt.system_prompt
    if sys_prompt is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": sys_prompt}] + msgs
    if fmt.chat_template is None:
        body = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs)
        return body + "Assistant:"
    if "{{" not in fmt.chat_template and "{%" not in fmt.chat_template:
        raise InputError(f"the chat template {fmt.chat_template[:40]!r} is not a Jinja template (a name such as "
                         "'chatml' is not enough)", fix="pass the template's Jinja text, e.g. --chat-template "
                         "\"$(cat template.jinja)\", or leave --chat-template out to use the model's own")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(fmt.chat_template).render(messages=msgs, add_generation_prompt=True,
                                                         bos_token="", eos_token="")
    except TemplateError as exc:
        raise InputError(f"the chat template failed to render: {exc}",
                         fix="pass a valid Jinja chat template with --chat-template") from exc
