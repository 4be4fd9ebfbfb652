"""Chat prompts: a list of messages rendered by the model's own chat template (Jinja, as transformers does).

An instruction-tuned model answers well only in the format it was tuned on (Gemma's `<start_of_turn>user`,
SmolLM2's `<|im_start|>user`...). Its checkpoint carries that format as a Jinja template; the exporter copies
it into the bundle (see bundle.chat_template) and this module renders it the way transformers'
`apply_chat_template` does: the same Jinja settings (trim_blocks, lstrip_blocks, loop controls), the same
helpers (raise_exception, strftime_now, a tojson that keeps non-ASCII), the special tokens as variables, and
the text then tokenized without adding special tokens (the template writes <bos> itself where it wants one).
Jinja2 is an optional dependency (`pip install 'edgemtp[chat]'`): apps that format prompts themselves do not
need it."""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Iterable

from ..errors import ArgumentError, EdgemtpError

INSTALL = "pip install 'edgemtp[chat]'"
JINJA2_MIN = (3, 1, 6)  # pyproject.toml's chat extra


def is_chat(prompt) -> bool:
    """A prompt given as messages (a list of {"role", "content"} dicts) rather than as text."""
    return isinstance(prompt, (list, tuple))


def check_messages(messages, name: str = "prompt") -> list[dict]:
    """`messages` as a list of dicts with a string role and content (what every chat template reads; None or left
    out for a tool call's), copies without the keys set to None."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Iterable):
        # a str or dict is iterable, but into letters or keys: chat_prompt("Hi") said "messages[0]='H' is not a
        # message", chat_prompt({"role": ...}) "messages[0]='role'"; chat_prompt(5) raised TypeError, None "holds
        # no messages"
        raise ArgumentError(name, messages, "must be a list of chat messages ({'role': ..., 'content': ...} dicts)")
    messages = list(messages)  # an empty generator is truthy
    if not messages:
        raise ArgumentError(name, messages, "holds no messages (a chat prompt is a list of "
                            "{'role': ..., 'content': ...} dicts)")
    for i, m in enumerate(messages):
        # an assistant's tool call may leave 'content' out (the OpenAI format does; apply_chat_template takes it):
        # it renders as with content None, which is dropped below
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not ("content" in m or "tool_calls" in m):
            raise ArgumentError(f"{name}[{i}]", m, "is not a message: a dict with a 'role' string and a "
                                "'content' (or, for a tool call, 'tool_calls')")
    # keys set to None left out, as apply_chat_template does: the OpenAI SDK dumps every unset field as None, and a
    # template tests keys ('tool_calls' in message: Llama 3.1 took an answer for a call) or prints them (a content
    # None was the text "None")
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


@lru_cache(maxsize=8)
def compile_template(template: str, source: str):
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EdgemtpError(f"chat prompts need jinja2: {INSTALL}") from None
    # the chat extra asks for 3.1.6, whose sandbox keeps |attr('format') in (CVE-2025-27516); a jinja2 the app had
    # before comes with plain `pip install edgemtp`, and a template from someone else must not run in an older one
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < JINJA2_MIN:
        raise EdgemtpError(f"chat prompts need jinja2 {'.'.join(map(str, JINJA2_MIN))} or later ({jinja2.__version__} "
                           f"is installed, whose sandbox a template can leave): {INSTALL}")

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (marks an assistant's tokens for training): its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    # a sandbox: a template comes with a checkpoint from someone else
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise EdgemtpError(f"{source}: the chat template does not parse (line {e.lineno}: {e.message})") from None
    except (ValueError, RecursionError, MemoryError) as e:  # Jinja folding a constant (10**100000 has more digits
        # than Python writes), expressions or blocks nested deeper than the parser or compiler recurses
        raise EdgemtpError(f"{source}: the chat template cannot be compiled ({e})") from None


RESERVED = ("messages", "add_generation_prompt", "tools", "documents")  # what render() sets itself


def check_chat_args(values) -> dict:
    """Extra template variables (transformers' apply_chat_template keyword arguments, e.g. Qwen3's and
    SmolLM3's enable_thinking): a dict of names to JSON values."""
    if not isinstance(values, dict):
        raise ArgumentError("chat_args", values,
                            "must be a dict of template variables, e.g. {'enable_thinking': False}")
    for name, value in values.items():
        if not isinstance(name, str) or not name.isidentifier() or name in RESERVED:
            raise ArgumentError("chat_args", values, f"has the name {name!r}: not a template variable one may set "
                                                     f"(a Python identifier other than {', '.join(RESERVED)})")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ArgumentError("chat_args", values, f"has {name}={value!r}: values must be JSON values "
                                                     "(bool, number, string, None, lists and dicts of them)") from None
        # a lone surrogate (a JSON "\\udcff"): the tokenizer refused the rendered prompt, not naming the variable
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ArgumentError("chat_args", values, f"has {name}={value!r}: a string that is not UTF-8 text "
                                                     "(a lone surrogate)") from None
    return dict(values)


class ChatTemplate:
    def __init__(self, template: str, special_tokens: dict[str, str], source: str, variables: dict | None = None):
        """`special_tokens`: e.g. {"bos_token": "<bos>", "eos_token": "<eos>"}, variables of the template;
        `source`: where the template came from, for messages; `variables`: more of them (check_chat_args)."""
        self.template, self.special_tokens, self.source = template, dict(special_tokens), source
        self.variables = check_chat_args(variables or {})

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages`, ending with the assistant turn's opening (add_generation_prompt)."""
        messages = check_messages(messages)
        compiled = compile_template(self.template, self.source)
        import jinja2  # there: compile_template found it

        try:
            text = compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                   documents=None, **{**self.special_tokens, **self.variables})
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, ArithmeticError, MemoryError,
                RecursionError) as e:
            # the template's raise_exception (roles that do not alternate...), a sandbox refusal, a message it
            # cannot read (content that is not text), a sandbox's range too long (OverflowError), a text too
            # large to allocate ('a' * 2**62: the sandbox bounds ranges, not sizes), a macro calling itself
            raise EdgemtpError(f"{self.source}: the chat template refused the messages "
                               f"({str(e) or type(e).__name__})") from None
        if not text.strip():  # else "the prompt is empty", which the user did not write
            raise EdgemtpError(f"{self.source}: the chat template wrote nothing for the messages")
        return text
