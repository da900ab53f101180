"""Prompt formats: render a conversation with a model's Jinja chat template (no transformers needed).

Training renders the delta's view of a prompt with this module and the runtime renders it the
same way, so the delta sees at decode time exactly the text layout it was trained on.

>>> fmt = PromptFormat(chat_template=None)
>>> render_prompt(fmt, [{"role": "user", "content": "Hi"}])
'User: Hi\\nAssistant:'
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=32)
def _compiled(chat_template: str):
    """The chat template compiled once: compiling costs ~7 ms, about as much as decoding a token,
    and every answer renders its prompt several times (the target's and the delta's view)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(chat_template)


def render_prompt(fmt: PromptFormat, messages: list[dict], system: str | None = None) -> str:
    """The prompt text (everything before the assistant's answer) in ``fmt``'s layout."""
    from jinja2 import TemplateError

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
    try:
        return _compiled(fmt.chat_template).render(messages=msgs, add_generation_prompt=True,
                                                   bos_token="", eos_token="")
    except TemplateError as exc:
        raise InputError(f"the chat template failed to render: {exc}",
                         fix="pass a valid Jinja chat template with --chat-template") from exc


class Prompt(str):
    """Prompt text that remembers which parts are the template's markup and which are data.

    A ``str`` (so code that only needs the text keeps working), plus ``parts``: ``(text, markup)``
    pairs in order. Tokenizers parse special tokens (``<|im_end|>``, ``<end_of_turn>``) only inside
    markup parts; data parts (message contents, a client's prompt) are always plain text, so a
    user cannot forge a turn by typing the template's markers. Slicing or concatenating a Prompt
    gives a plain ``str``, which tokenizers treat as markup (trusted text, as before).

    >>> p = Prompt([("<|im_start|>user\\n", True), ("hi<|im_end|>", False), ("<|im_end|>\\n", True)])
    >>> p, p.data_parts()
    ('<|im_start|>user\\nhi<|im_end|><|im_end|>\\n', ['hi<|im_end|>'])
    """

    parts: tuple[tuple[str, bool], ...]

    def __new__(cls, parts):
        parts = tuple((t, bool(m)) for t, m in parts if t)
        obj = super().__new__(cls, "".join(t for t, _ in parts))
        obj.parts = parts
        return obj

    @classmethod
    def data(cls, text: str) -> "Prompt":
        """All of ``text`` is data (a completion prompt from a client)."""
        return cls([(text, False)])

    def data_parts(self) -> list[str]:
        return [t for t, m in self.parts if not m]

    def __reduce__(self):
        return (Prompt, (self.parts,))


def split_specials(text: str, specials: dict[str, int]) -> list[str | int]:
    """``text`` cut at every occurrence of a special token's text: plain strings and token ids.

    Longer specials are matched first, as llama.cpp and ``tokenizers`` do.

    >>> split_specials("a<s>b</s>", {"<s>": 1, "</s>": 2})
    ['a', 1, 'b', 2]
    """
    frags: list[str | int] = [text]
    for sp in sorted(specials, key=len, reverse=True):
        out: list[str | int] = []
        for f in frags:
            if not isinstance(f, str) or sp not in f:
                out.append(f)
                continue
            pieces = f.split(sp)
            for i, piece in enumerate(pieces):
                if i:
                    out.append(specials[sp])
                if piece:
                    out.append(piece)
        frags = out
    return frags


def prompt_fragments(prompt: str, specials: dict[str, int]) -> list[str | int]:
    """The fragments a tokenizer encodes: special ids found in markup parts, and maximal plain
    strings (markup text and data merged, so a data part tokenizes as it would inline). A plain
    ``str`` is all markup."""
    parts = prompt.parts if isinstance(prompt, Prompt) else ((str(prompt), True),)
    frags: list[str | int] = []
    for text, markup in parts:
        for f in (split_specials(text, specials) if markup else [text]):
            if isinstance(f, str) and frags and isinstance(frags[-1], str):
                frags[-1] += f
            else:
                frags.append(f)
    return frags


_HOLE = "\ue000{}:{}\ue001"    # private-use characters around a nonce: a stand-in no real content contains


def render_prompt_parts(fmt: PromptFormat, messages: list[dict], system: str | None = None, *,
                        keep_all: bool = False) -> Prompt:
    """:func:`render_prompt`, keeping message contents apart from the template's own text.

    The template is rendered once with the real contents and once with a stand-in for each
    content (its leading and trailing whitespace kept, so a template's ``| trim`` acts alike);
    the stand-ins mark where the contents go. If the two renderings do not line up (a template
    that rewrites contents), the conversation is refused rather than tokenized unsafely. With
    ``keep_all``, so is a conversation whose template leaves a message's content out (a delta
    must read everything the target reads).
    """
    import re
    import secrets

    full = render_prompt(fmt, messages, system)
    nonce = secrets.token_hex(6)
    cores, roles, holed = [], [], []
    for i, m in enumerate(messages):
        c = m["content"]
        core = c.strip()
        if not core:
            holed.append(m)
            continue
        lead = c[: len(c) - len(c.lstrip())]
        holed.append({**m, "content": lead + _HOLE.format(nonce, len(cores)) + c[len(lead) + len(core):]})
        cores.append(core)
        roles.append(m["role"])
    if not cores:
        return Prompt([(full, True)])
    pieces = re.split("\ue000" + nonce + r":(\d+)\ue001", render_prompt(fmt, holed, system))
    left = sorted(set(range(len(cores))) - {int(p) for p in pieces[1::2]})
    if keep_all and left:
        raise InputError(f"its prompt format leaves out the content of a {roles[left[0]]} message: the model would "
                         "read it and the delta would not", fix="put that text in a message the format keeps")
    parts = [(p, True) if k % 2 == 0 else (cores[int(p)], False) for k, p in enumerate(pieces)]
    prompt = Prompt(parts)
    if str(prompt) != full:
        raise InputError("the chat template changes message contents as it renders them, so they cannot be "
                         "kept apart from its control tokens",
                         fix="use a chat template that inserts message['content'] unchanged (--chat-template)")
    return prompt
