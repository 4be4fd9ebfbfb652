"""Chat prompts: the model's chat template copied into the bundle and rendered as transformers renders it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgemtp import bundle as bundle_mod
from edgemtp.cli import cli
from edgemtp.errors import EdgemtpError
from edgemtp.exporters import chat_template, export
from edgemtp.runtime.chat import ChatTemplate
from edgemtp.runtime.engine import Draft, Engine

from .cli_errors import assert_one_line_error

# Gemma 3's instruction format (a system message folded into the first user turn, alternation enforced by
# raise_exception), written with whitespace control as Gemma's own template is
GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{ message['content'] | trim }}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""
# what else templates use: tojson (non-ASCII kept), loop controls, {% generation %}, block trimming
OTHER = """{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
<|{{ m.role }}|>{{ m | tojson }}{% generation %} {{ m.content }}{% endgeneration %}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "  Déjà vu, 日本語 🙂  "}],
    [{"role": "user", "content": "def f(x):\n    return x"}, {"role": "assistant", "content": "A function."},
     {"role": "user", "content": "And g?"}],
]


def model_with_template(src, dst, template, where="tokenizer_config.json"):
    """A copy of model directory `src` (tokenizer files only, unless it is a tiny model) with `template`."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors") if "270" in str(src) else None)
    config = json.loads((dst / "tokenizer_config.json").read_text()) if (dst / "tokenizer_config.json").exists() \
        else {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t2", "eos_token": "t1"}
    if where == "tokenizer_config.json":
        config["chat_template"] = template
    else:
        (dst / where).write_text(template)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("template", [GEMMA, OTHER], ids=["gemma", "other"])
def test_rendered_as_transformers_renders_it(gemma3_270m_dir, tmp_path, template):
    """Gemma 3 270M's tokenizer with a chat template: the text and the token ids of each conversation are
    transformers' apply_chat_template's (add_generation_prompt, tokenized without added special tokens: the
    template writes <bos>); the template found in chat_template.jinja too."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    for where in ("tokenizer_config.json", "chat_template.jinja"):
        d = model_with_template(gemma3_270m_dir, tmp_path / where, template, where)
        found, special, source = chat_template.find(d)
        assert found == template and source.endswith(where) and special["bos_token"] == "<bos>"
        ours, tok = ChatTemplate(found, special, source), Tokenizer.from_file(str(d / "tokenizer.json"))
        theirs = AutoTokenizer.from_pretrained(d)
        for chat in CHATS:
            text = ours.render(chat)
            assert text == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
            assert tok.encode(text, add_special_tokens=False).ids == list(ids)
        if template is GEMMA:
            assert ours.render(CHATS[0]).count("<bos>") == 1 and text.endswith("<start_of_turn>model\n")
            bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
            with pytest.raises(EdgemtpError, match="chat template refused the messages.*must alternate"):
                ours.render(bad)


def test_every_named_special_token_is_a_variable(gemma3_270m_dir, tmp_path):
    """The template sees each special token apply_chat_template passes (its tokenizer's special_tokens_map):
    sep_token, cls_token and mask_token as well as bos / eos / unk / pad, and a model's own named ones
    (tokenizer_config.json's extra_special_tokens: Gemma 3's boi_token, image_token...); those were undefined,
    written as nothing (a template ending each turn with {{ sep_token }} lost its separators without a word)."""
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}{{ cls_token }}{{ m.content }}{{ sep_token }}{% endfor %}"
                "{{ mask_token }}{{ boi_token }}{{ image_token }}{{ eos_token }}")
    d = model_with_template(gemma3_270m_dir, tmp_path / "model", template)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update(sep_token="<eos>", cls_token={"content": "<bos>", "__type": "AddedToken"}, mask_token="<mask>",
                  extra_special_tokens={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>"})
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    ours = ChatTemplate(*chat_template.find(d)).render(CHATS[2])
    assert ours == AutoTokenizer.from_pretrained(d).apply_chat_template(CHATS[2], tokenize=False)
    assert ours.count("<eos>") == 4 and ours.endswith("<mask><start_of_image><image_soft_token><eos>"), ours


# Llama 3.1's turns: a message holding 'tool_calls' is a call (an assistant's), a tool's is its result
LLAMA31_TURNS = """{%- for message in messages %}
    {%- if not (message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim }}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls | length == 1 %}{{- raise_exception('single tool-calls only') }}{%- endif %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' + message.tool_calls[0].function | tojson }}
        {{- '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message.content + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""


def test_keys_set_to_none_are_left_out_as_transformers_does():
    """Messages as the OpenAI SDK dumps them (every unset field None: an answer's tool_calls, a call's content)
    render as apply_chat_template renders them, which drops the keys whose value is None: Llama 3.1's template
    read an answer with tool_calls None as a call (refused: None has no length), a call's content None as the
    text "None"."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    chat = [{"role": "user", "content": "Hi", "name": None},
            {"role": "assistant", "content": "Hello!", "tool_calls": None, "function_call": None, "refusal": None},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "20C", "name": None}, {"role": "user", "content": "Thanks"}]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    ours = ChatTemplate(LLAMA31_TURNS, {}, "here").render(chat)
    theirs = tok.apply_chat_template(chat, chat_template=LLAMA31_TURNS, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert "None" not in ours and '"city": "Paris"' in ours and chat[1]["tool_calls"] is None  # the caller's kept
    closed = tok.apply_chat_template(chat, chat_template=LLAMA31_TURNS, tokenize=False, add_generation_prompt=False)
    assert ChatTemplate(LLAMA31_TURNS, {}, "here").render(chat, add_generation_prompt=False) == closed != theirs
    del chat[3]["content"]  # a tool call without 'content' (the OpenAI format allows it): the same text
    assert ChatTemplate(LLAMA31_TURNS, {}, "here").render(chat) == theirs


@pytest.mark.parametrize("messages,match", [
    ([], "holds no messages"),
    ([{"content": "no role"}], r"prompt\[0\]=.* is not a message"),
    ([{"role": "user"}], r"prompt\[0\]=\{'role': 'user'\} is not a message: .* 'content' \(or, for a tool call"),
    (["text"], r"prompt\[0\]='text' is not a message"),
    ("text", r"^prompt='text' must be a list of chat messages"),  # not its letters
    ({"role": "user", "content": "a"}, r"^prompt=\{'role': 'user', 'content': 'a'\} must be a list of chat"),
    # not iterable: Engine.chat_prompt(5) raised TypeError "'int' object is not iterable", None "holds no messages"
    (5, r"^prompt=5 must be a list of chat messages"),
    (None, r"^prompt=None must be a list of chat messages"),
    (iter([]), "holds no messages"),  # an empty generator is truthy
])
def test_bad_messages_are_named(messages, match):
    with pytest.raises(EdgemtpError, match=match):
        ChatTemplate(GEMMA, {"bos_token": "<bos>"}, "here").render(messages)


@pytest.mark.parametrize("config,match", [
    ({"chat_template": 3}, "tokenizer_config.json: chat_template is not a template"),
    ({"chat_template": [{"name": "tool_use", "template": "x"}]},
     "tokenizer_config.json: chat_template is not a template"),
    ({"chat_template": "{% for m in messages %}"}, "tokenizer_config.json: the chat template does not parse (line"),
])
def test_bad_templates_fail_the_export_first(tiny_gemma3, tmp_path, config, match):
    """A template that is not one, or does not parse, is named at export, before any weight is written."""
    d = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], d)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(cli, ["export", str(d), "-o", str(tmp_path / "b"), "--max-context", "64"])
    assert_one_line_error(r, f"{d / match}" if match.startswith("tokenizer_config") else match)
    assert not (tmp_path / "b").exists()


def test_a_template_file_that_is_a_directory_is_named(tiny_gemma3, tmp_path):
    """A chat_template.jinja that is a directory (or a FIFO): the export used tokenizer_config.json's template
    instead without a word, though the model directory holds the file that comes first."""
    d = model_with_template(tiny_gemma3[1], tmp_path / "model", "{{ bos_token }}")
    (d / "chat_template.jinja").mkdir()
    r = CliRunner().invoke(cli, ["export", str(d), "-o", str(tmp_path / "b"), "--max-context", "64"])
    assert_one_line_error(r, f"{d / 'chat_template.jinja'}: is a directory, not a file")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ["chat_template.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "generation_config.json", "tokenizer.json", "config.json"])
def test_a_model_file_that_is_a_directory_is_named(tiny_gemma3, tmp_path, name):
    """A model directory's chat_template.json, tokenizer_config.json, special_tokens_map.json or
    generation_config.json that is a directory: the export went on as if it were absent (another template or
    none, the special tokens or the stop ids lost) without a word. Each is named on one line, as tokenizer.json
    and config.json are."""
    d = model_with_template(tiny_gemma3[1], tmp_path / "model", "{{ bos_token }}")
    if (d / name).exists():
        (d / name).unlink()
    (d / name).mkdir()
    r = CliRunner().invoke(cli, ["export", str(d), "-o", str(tmp_path / "b"), "--max-context", "64"])
    assert_one_line_error(r, f"{d / name}: is a directory, not a file (")
    assert not (tmp_path / "b").exists()


TINY = ("{{ bos_token }} {% for m in messages %}t5 {{ 't6' if m.role == 'user' else 't7' }} {{ m.content }} t8 "
        "{% endfor %}{% if add_generation_prompt %}t5 t7{% endif %}")


@pytest.fixture(scope="module")
def chat_bundle(tiny_gemma3, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    d = model_with_template(tiny_gemma3[1], root / "model", TINY)
    return export(d, root / "bundle", capacity=64)


def test_bundle_carries_the_template_and_generates_from_messages(chat_bundle, tiny_gemma3, tmp_path):
    """The export copies the template into the bundle (manifest "chat", hashed like every file); a chat
    prompt generates what its rendered text generates, plain and drafting, from Python and `generate --chat`
    (--system before the user's message); int8 quantization keeps the template."""
    b = bundle_mod.load(chat_bundle)
    assert b.manifest["chat"] == {"template": "chat_template.jinja",
                                  "special_tokens": {"bos_token": "t2", "eos_token": "t1"}}
    assert "chat_template.jinja" in b.manifest["files"] and (chat_bundle / "chat_template.jinja").read_text() == TINY
    engine = Engine.load(chat_bundle)
    chat = [{"role": "system", "content": "t9"}, {"role": "user", "content": "t3 t4"}]
    assert engine.chat_prompt(chat) == "t2 t5 t7 t9 t8 t5 t6 t3 t4 t8 t5 t7"
    assert engine.encode(chat) == [2, 5, 7, 9, 8, 5, 6, 3, 4, 8, 5, 7] == engine.encode(engine.chat_prompt(chat))
    want = engine.generate(engine.chat_prompt(chat), 8)
    for draft in (None, Draft("lookup", 3)):
        assert engine.generate(chat, 8, draft=draft).tokens == want.tokens
        assert "".join(engine.stream(chat, 8, draft=draft)) == want.text
    assert [g.tokens for g in engine.generate_batch([chat, chat[1:]], 8)] == \
        [want.tokens, engine.generate(chat[1:], 8).tokens]
    args = ["generate", str(chat_bundle), "--prompt", "t3 t4", "--max-new-tokens", "8", "--json"]
    out = json.loads(CliRunner().invoke(cli, args + ["--chat", "--system", "t9"]).stdout)
    assert out["tokens"] == want.tokens
    from edgemtp.exporters.quantize import quantize_bundle

    q = bundle_mod.load(quantize_bundle(chat_bundle, tmp_path / "int8", "int8", calibration=None))
    assert q.manifest["chat"] == b.manifest["chat"] and Engine.load(q.dir).chat_prompt(chat) == engine.chat_prompt(chat)


def test_chat_mistakes_are_one_line(chat_bundle, tiny_gemma3, tmp_path):
    """--chat on a bundle without a template, --system without --chat, a template refusing the messages (its
    message's line breaks as \\n), a manifest whose chat entry names no file: one line naming the culprit, exit
    status 2."""
    def run(*args):
        return CliRunner().invoke(cli, ["generate", *map(str, args), "--max-new-tokens", "2"])

    r = run(tiny_gemma3[2], "--prompt", "t3", "--chat")
    assert_one_line_error(r, f"{tiny_gemma3[2]}: the bundle has no chat template")
    r = run(chat_bundle, "--prompt", "t3", "--system", "t4")
    assert_one_line_error(r, "--system applies to --chat")
    with pytest.raises(EdgemtpError, match="prompt=3 must be text or a list of chat messages"):
        Engine.load(chat_bundle).generate(3, 2)
    refusing = tmp_path / "refusing"
    shutil.copytree(chat_bundle, refusing)
    (refusing / "chat_template.jinja").write_text("{{ raise_exception('only one message') }}")
    m = {k: v for k, v in json.loads((refusing / bundle_mod.MANIFEST).read_text()).items()
         if k not in ("files", "format", "schema_version")}
    bundle_mod.write_manifest(refusing, m)  # a re-signed bundle: the template is what is wrong
    r = run(refusing, "--prompt", "t3", "--chat")
    assert_one_line_error(r, f"{refusing / 'chat_template.jinja'}: the chat template refused the messages "
                          "(only one message)")
    # a message over two lines: one error line, its break written \n (printed as it was, a second line held its end)
    (refusing / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate\nuser/assistant') }}")
    bundle_mod.write_manifest(refusing, m)
    r = run(refusing, "--prompt", "t3", "--chat")
    assert_one_line_error(r, exact=f"{refusing / 'chat_template.jinja'}: the chat template refused the messages "
                          "(roles must alternate\\nuser/assistant)")
    (refusing / "chat_template.jinja").write_text("{# says nothing #}")
    bundle_mod.write_manifest(refusing, m)
    r = run(refusing, "--prompt", "t3", "--chat")
    assert_one_line_error(r, f"{refusing / 'chat_template.jinja'}: the chat template wrote nothing for the messages")
    m["chat"]["template"] = "nothere.jinja"
    bundle_mod.write_manifest(refusing, m)
    r = run(refusing, "--prompt", "t3", "--chat")
    assert_one_line_error(r, "chat.template must name a file listed in 'files'")


def test_without_jinja2_the_install_is_named(monkeypatch):
    """jinja2 is an optional dependency: without it a chat prompt says what to install."""
    import sys

    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 now raises ImportError
    with pytest.raises(EdgemtpError, match=r"chat prompts need jinja2: pip install 'edgemtp\[chat\]'"):
        ChatTemplate(TINY + " ", {}, "here").render([{"role": "user", "content": "t3"}])


def test_a_jinja2_whose_sandbox_leaks_is_refused(monkeypatch):
    """A template comes with a bundle from someone else, so it runs in Jinja's sandbox, which jinja2 before 3.1.6
    lets a template leave (|attr('format') reached object.__subclasses__ in 3.1.5: CVE-2025-27516). The chat
    extra asks for 3.1.6, but an app installing plain edgemtp keeps the jinja2 it had: chat prompts used it."""
    import jinja2

    from edgemtp.runtime.chat import compile_template

    leak = "{{ '{0.__class__.__mro__[1].__subclasses__}'|attr('format')(1) }}"
    messages = [{"role": "user", "content": "t3"}]
    monkeypatch.setattr(jinja2, "__version__", "3.1.5")
    compile_template.cache_clear()
    with pytest.raises(EdgemtpError) as e:
        ChatTemplate(leak, {}, "here").render(messages)
    assert str(e.value) == ("chat prompts need jinja2 3.1.6 or later (3.1.5 is installed, whose sandbox a template "
                            "can leave): pip install 'edgemtp[chat]'")
    monkeypatch.setattr(jinja2, "__version__", "3.1.6")
    compile_template.cache_clear()
    with pytest.raises(EdgemtpError, match="the chat template refused the messages .*__class__"):
        ChatTemplate(leak, {}, "here").render(messages)  # the real 3.1.6+ sandbox refuses it
    assert ChatTemplate(TINY, {"bos_token": "t1"}, "here").render(messages) == "t1 t5 t6 t3 t8 t5 t7"


def test_chat_command_keeps_the_conversation(chat_bundle, tiny_gemma3):
    """`edgemtp chat`: each input line is a user's message, the replies are what a fresh engine generates for
    the conversation so far (replies included), later turns run only their new tokens, /reset starts over,
    a turn outgrowing the capacity is refused and the chat goes on; without a template it fails first."""
    fresh, chat, replies = Engine.load(chat_bundle), [{"role": "system", "content": "t9"}], []
    for said in ("t3 t4", "t5"):
        chat.append({"role": "user", "content": said})
        replies.append(fresh.generate(chat, 6).text)
        chat.append({"role": "assistant", "content": replies[-1]})
    chat = [chat[0], {"role": "user", "content": "t6"}]
    after_reset = fresh.generate(chat, 6).text
    chat += [{"role": "assistant", "content": after_reset}, {"role": "user", "content": "t6"}]
    last = fresh.generate(chat, 6).text  # the turn between, refused, is not in the conversation
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--system", "t9", "--max-new-tokens", "6"],
                           input="t3 t4\n\nt5\n/reset\nt6\n" + " ".join(["t7"] * 70) + "\nt6\n/exit\nt8\n")
    assert r.exit_code == 2 and r.stderr.endswith("error: 1 message(s) of the input got no reply (each error is "
                                                  "above)\n"), r.output  # input from a pipe: a script learns it
    lines = r.stdout.splitlines()
    assert lines == [replies[0], replies[1], after_reset, last], r.output
    speeds = [line for line in r.stderr.splitlines() if line.startswith("[prefill")]
    assert len(speeds) == 4 and "cached" not in speeds[0] and all("more cached" in s for s in speeds[1:]), speeds
    assert ("does not fit the bundle's KV capacity of 64" in r.stderr
            and "/reset starts the conversation over" in r.stderr)
    r = CliRunner().invoke(cli, ["chat", str(tiny_gemma3[2])], input="t3\n")
    assert_one_line_error(r, f"{tiny_gemma3[2]}: the bundle has no chat template")


def test_chat_json_gives_one_line_per_message(chat_bundle):
    """`chat --json`: a program reads one JSON object per message, in order (a reply's newlines split the
    plain output into lines that could not be told from the next reply's): the reply's text and tokens as a
    fresh engine generates them for the conversation so far, its stats, or {"error"} for a refused message."""
    import json

    fresh, chat, want = Engine.load(chat_bundle), [], []
    for said in ("t3 t4", "t5"):
        chat.append({"role": "user", "content": said})
        want.append(fresh.generate(chat, 6).to_json())
        chat.append({"role": "assistant", "content": want[-1]["text"]})
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--json", "--max-new-tokens", "6"],
                           input="t3 t4\n" + " ".join(["t7"] * 70) + "\nt5\n")
    assert r.exit_code == 2 and r.stderr.startswith("error: 1 message(s)"), r.output
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(g.get("text"), g.get("tokens")) for g in (got[0], got[2])] == [(w["text"], w["tokens"]) for w in want]
    assert got[2]["stats"]["cached_tokens"] > 0 and got[2]["stats"]["decode_tokens"] == len(want[1]["tokens"]) - 1
    assert set(got[1]) == {"error"} and "does not fit the bundle's KV capacity of 64" in got[1]["error"] and \
        got[1]["error"].endswith("/reset starts the conversation over") and len(got) == 3


def test_chat_json_answers_an_empty_message_with_an_error_line(chat_bundle):
    """`chat --json` writes a line for every message read: an empty one is an {"error"} line (it was skipped
    without one, and a program waiting for each message's line waited forever); /reset writes none."""
    import json

    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--json", "--max-new-tokens", "4"],
                           input="t3\n\n   \n/reset\nt5\n")
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [sorted(g) for g in got] == [["stats", "text", "tokens"], ["error"], ["error"],
                                        ["stats", "text", "tokens"]], r.output
    assert got[1]["error"] == "an empty message: nothing to answer" and r.exit_code == 2


def test_chat_commands_help_and_a_mistyped_one(chat_bundle):
    """/help (or /?) lists the commands; a mistyped one (one word after a slash) is an error, not a message for
    the model; a message starting with a path is sent as typed. With --json each gets its line."""
    import json

    from edgemtp.cli.chat import CHAT_HELP

    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--max-new-tokens", "4"],
                           input="/help\n/clear\n/t3/t4 t5\n/exit\n")
    assert r.stdout.startswith(CHAT_HELP + "\n") and r.exit_code == 2, r.output
    assert r.stderr.splitlines()[0] == f"error: unknown command /clear ({CHAT_HELP})", r.stderr
    assert "[prefill" in r.stderr  # the path-like message was answered
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--json", "--max-new-tokens", "4"],
                           input="/?\n/clear\nt3\n")
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [sorted(g) for g in got] == [["help"], ["error"], ["stats", "text", "tokens"]], r.output
    assert got[0]["help"] == CHAT_HELP and got[1]["error"].startswith("unknown command /clear")


def interrupted_once(generate, stopped: list, at: int = 2):
    """An Engine method yielding what `generate` yields, but raising KeyboardInterrupt (Ctrl-C) at its item `at`
    (the third by default) the first time (until `stopped` is cleared)."""
    def method(self, *args, **kwargs):
        for i, item in enumerate(generate(self, *args, **kwargs)):
            if i == at and not stopped:
                stopped.append(True)
                raise KeyboardInterrupt
            yield item
    return method


def test_ctrl_c_at_a_terminal_stops_the_reply_not_the_chat(chat_bundle, monkeypatch):
    """Ctrl-C while a reply streams, with a person at the terminal: the reply stops where it is, stays in the
    conversation as shown, and the next message is answered as a fresh engine answers that conversation
    (Ctrl-C ended the whole chat before). From a pipe Ctrl-C still ends it."""
    from edgemtp.cli import chat as chat_mod

    stream, stopped = Engine.stream, []
    monkeypatch.setattr(Engine, "stream", interrupted_once(stream, stopped))
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--max-new-tokens", "6", "--no-draft"], input="t3\n")
    assert r.exit_code == 130 and "Aborted" in r.output, r.output  # from a pipe: the chat ends
    stopped.clear()
    monkeypatch.setattr(chat_mod, "stdin_is_terminal", lambda: True)
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--max-new-tokens", "6", "--no-draft"],
                           input="t3 t4\nt5\n")
    assert r.exit_code == 0 and "(reply stopped" in r.stderr, r.output
    first, second = [line.removeprefix("> ") for line in r.stdout.splitlines()[:2]]
    monkeypatch.setattr(Engine, "stream", stream)
    fresh = Engine.load(chat_bundle)
    whole = fresh.generate([{"role": "user", "content": "t3 t4"}], 6).text
    assert whole.startswith(first) and first != whole  # stopped after two pieces
    chat = [{"role": "user", "content": "t3 t4"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "t5"}]
    assert second == fresh.generate(chat, 6).text
    # Ctrl-C before the reply's first piece: the message is taken back (an empty reply was kept before)
    stopped.clear()
    monkeypatch.setattr(Engine, "stream", interrupted_once(stream, stopped, at=0))
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--max-new-tokens", "6", "--no-draft"],
                           input="t3 t4\nt5\n")
    assert r.exit_code == 0 and "(reply stopped before it began: your message is dropped" in r.stderr, r.output
    lines = [line.removeprefix("> ") for line in r.stdout.splitlines()]
    assert lines[0] == "" and lines[1] == fresh.generate([{"role": "user", "content": "t5"}], 6).text


def test_ctrl_c_at_a_terminal_ends_a_json_reply_as_it_stands(chat_bundle, monkeypatch):
    """With --json at a terminal Ctrl-C ends the reply as in the plain chat: its line holds the tokens so far
    and stop_reason "interrupted", and the next reply is what a fresh engine gives that conversation."""
    import json

    from edgemtp.cli import chat as chat_mod

    token_stream, stopped = Engine.token_stream, []
    monkeypatch.setattr(Engine, "token_stream", interrupted_once(token_stream, stopped))
    args = ["chat", str(chat_bundle), "--json", "--max-new-tokens", "6", "--no-draft"]
    r = CliRunner().invoke(cli, args, input="t3\n")
    assert r.exit_code == 130 and "Aborted" in r.output, r.output  # from a pipe: the chat ends
    stopped.clear()
    monkeypatch.setattr(chat_mod, "stdin_is_terminal", lambda: True)
    r = CliRunner().invoke(cli, args, input="t3 t4\nt5\n")
    assert r.exit_code == 0, r.output
    first, second = [json.loads(line) for line in r.stdout.splitlines()]
    monkeypatch.setattr(Engine, "token_stream", token_stream)
    fresh = Engine.load(chat_bundle)
    whole = fresh.generate([{"role": "user", "content": "t3 t4"}], 6)
    assert first["tokens"] == whole.tokens[:2] and first["stats"]["stop_reason"] == "interrupted"
    assert first["text"] == fresh.decode(whole.tokens[:2])
    chat = [{"role": "user", "content": "t3 t4"}, {"role": "assistant", "content": first["text"]},
            {"role": "user", "content": "t5"}]
    assert second == {**second, **{k: v for k, v in fresh.generate(chat, 6).to_json().items() if k != "stats"}}
    # drafting: the per-row stop_reasons say it too (they were [] beside stop_reason "interrupted")
    stopped.clear()
    monkeypatch.setattr(Engine, "token_stream", interrupted_once(token_stream, stopped))
    r = CliRunner().invoke(cli, [*args[:-1], "--draft", "lookup"], input="t3 t4\n")
    stats = json.loads(r.stdout.splitlines()[0])["stats"]
    assert r.exit_code == 0 and stats["stop_reason"] == "interrupted", r.output
    assert stats["stop_reasons"] == ["interrupted"], stats


def test_chat_that_cannot_fit_says_why(chat_bundle):
    """A --system message leaving no room fails first (exit 2); a first message too long for the capacity is
    refused without suggesting /reset, which cannot help (nothing earlier to drop)."""
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--system", " ".join(["t9"] * 70)], input="t3\n")
    line = assert_one_line_error(r, "KV capacity of 64")
    assert line.startswith("error: --system: the conversation would open with"), line
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--max-new-tokens", "2"],
                           input=" ".join(["t7"] * 70) + "\nt3\n")
    assert r.exit_code == 2 and "does not fit the bundle's KV capacity of 64" in r.stderr, r.output
    assert "/reset" not in r.stderr and len(r.stdout.splitlines()) == 1  # the next line was answered


def test_system_and_chat_args_are_utf8_in_an_ascii_locale(chat_bundle):
    """In the C locale without UTF-8 mode Python reads each byte of an é on the command line as a lone
    surrogate: --system and --chat-arg are the UTF-8 text their bytes spell, as --prompt and --stop are."""
    from edgemtp.cli.run import parse_chat_args

    def ascii_argv(text):  # as Python decodes the command line there
        return text.encode("utf-8").decode("ascii", "surrogateescape")

    assert parse_chat_args((ascii_argv('mood="café"'), ascii_argv("name=日本"))) == {"mood": "café", "name": "日本"}
    args = ["generate", str(chat_bundle), "--chat", "--prompt", "t3", "--max-new-tokens", "4", "--json", "--system"]
    want = CliRunner().invoke(cli, [*args, "t9 café"])
    r = CliRunner().invoke(cli, [*args, ascii_argv("t9 café")])
    assert want.exit_code == r.exit_code == 0 and json.loads(r.stdout)["tokens"] == json.loads(want.stdout)["tokens"], \
        r.output


def test_a_chat_arg_that_is_not_utf8_text_is_named(chat_bundle):
    """A --chat-arg whose bytes are not UTF-8 (a lone surrogate in Python's argv), or whose JSON string spells a
    lone surrogate ("\\udcff"): the tokenizer refused the rendered prompt as "prompt is not UTF-8 text ... at
    character 0", naming neither the flag nor where, and a template not using the variable ran on. Named first,
    as --system is; the Python API's chat_args refuse such a string too."""
    args = ["generate", str(chat_bundle), "--chat", "--prompt", "t3", "--max-new-tokens", "2", "--chat-arg"]
    r = CliRunner().invoke(cli, [*args, "mood=\udcff"])
    assert_one_line_error(r, exact="--chat-arg 'mood=\\udcff': not valid UTF-8 text")
    r = CliRunner().invoke(cli, [*args, 'mood="\\udcff"'])
    assert_one_line_error(r, exact="--chat-arg 'mood=\"\\\\udcff\"' has mood='\\udcff': a string that is not UTF-8 "
                                   "text (a lone surrogate)")
    with pytest.raises(EdgemtpError, match="has mood=.*a string that is not UTF-8 text"):
        ChatTemplate(TINY, {}, "here", {"mood": ["ok", {"x": "\udcff"}]})


def test_an_empty_system_message_is_refused(chat_bundle):
    """--system "" (a script's unset variable) was taken: Gemma 3's template then opened the user's turn with a
    blank line, a Qwen-style one with an empty system turn, neither the conversation without one that was meant.
    Empty or blank, it is refused, naming --system, by generate --chat and chat alike."""
    for value, what in (("", "empty"), (" \n", "only whitespace")):
        for args in (["generate", str(chat_bundle), "--chat", "--prompt", "t3", "--system", value],
                     ["chat", str(chat_bundle), "--system", value]):
            r = CliRunner().invoke(cli, args, input="t3\n")
            assert_one_line_error(r, exact=f"--system is {what} (leave it out for a conversation without one)")


def test_text_that_is_not_utf8_is_named(chat_bundle, monkeypatch):
    """Bytes that are not UTF-8 on the command line (lone surrogates to Python) or on chat's input: one line
    naming where, not the tokenizer's traceback; a template whose sandboxed range is too long is refused. chat's
    --system is checked before the engine loads: a provider missing from the build warned first."""
    from edgemtp.runtime import session

    monkeypatch.setattr(session.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # cuda falls back
    for args, where in ((["generate", str(chat_bundle), "--prompt", "t3 \udcff"], "--prompt"),
                        (["generate", str(chat_bundle), "--chat", "--system", "\udcff", "--prompt", "t3"], "--system"),
                        (["chat", str(chat_bundle), "--provider", "cuda", "--system", "\udcff"], "--system")):
        r = CliRunner().invoke(cli, args)
        assert_one_line_error(r, exact=f"{where}: not valid UTF-8 text")
    # a strict UTF-8 stdin (most locales) raises inside the read: chat reads bytes, names the line, goes on
    r = subprocess.run([sys.executable, "-m", "edgemtp.cli", "chat", str(chat_bundle), "--max-new-tokens", "2"],
                       input=b"caf\xe9\nt3\n", capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 2 and r.stderr.decode().startswith(
        "error: the input line: not UTF-8 text (byte 0xe9 at offset 3)\n"), r.stderr
    assert len(r.stdout.decode().splitlines()) == 1  # the next line was answered
    with pytest.raises(EdgemtpError, match="refused the messages"):
        ChatTemplate("{% for i in range(10**30) %}{% endfor %}", {}, "here").render([{"role": "user", "content": "a"}])



@pytest.mark.parametrize("template,match", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ '{0.__class__.__mro__}'.format('') }}", "access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ cycler.__init__.__globals__ }}", "access to attribute '__init__' of 'type' object is unsafe"),
    ("{{ messages.append(1) }}", "access to attribute 'append' of 'list' object is unsafe"),
    ("{{ 'a' * 2**62 }}", r"\(MemoryError\)"),  # once a MemoryError traceback
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", r"\(maximum recursion depth exceeded"),  # once a traceback
])
def test_template_from_someone_else_is_sandboxed(template, match):
    """A bundle's chat template comes from whoever made the bundle: no way out to Python's objects, and one
    that asks for more memory than there is fails as a refusal, not a traceback."""
    with pytest.raises(EdgemtpError, match=f"here: the chat template refused the messages .*{match}"):
        ChatTemplate(template, {}, "here").render([{"role": "user", "content": "a"}])


@pytest.mark.parametrize("template,match", [
    ("{{ 10**100000 }}", r"Exceeds the limit \(4300 digits\)"),  # Jinja folds the constant while compiling
    ("{{ " + "(" * 1000 + "1" + ")" * 1000 + " }}", "maximum recursion depth exceeded"),
    ("{% if 1 %}" * 500 + "{% endif %}" * 500, "maximum recursion depth exceeded"),
])
def test_template_that_cannot_be_compiled_is_named(template, match):
    """Compiling a template can fail other than by its syntax (Jinja's constant folding, Python's recursion limit):
    named as the template's, not a traceback."""
    with pytest.raises(EdgemtpError, match=f"here: the chat template cannot be compiled \\({match}"):
        ChatTemplate(template, {}, "here").render([{"role": "user", "content": "a"}])


THINKING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
            "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_chat_args_are_template_variables_as_transformers_passes_them(chat_bundle, tiny_gemma3, tmp_path):
    """chat_args (`--chat-arg NAME=VALUE`) reach the template as apply_chat_template's keyword arguments do
    (Qwen3's enable_thinking=False: an empty thinking block); bad ones are named, before any work."""
    from transformers.utils.chat_template_utils import render_jinja_template

    chat = [{"role": "user", "content": "hi"}]
    for args in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        ours = ChatTemplate(THINKING, {}, "here", args).render(chat)
        theirs = render_jinja_template(conversations=[chat], chat_template=THINKING, add_generation_prompt=True,
                                       **args)[0][0]
        assert ours == theirs, args
    assert "<think>" in ChatTemplate(THINKING, {}, "here", {"enable_thinking": False}).render(chat)
    for bad, match in (("x", "chat_args='x' must be a dict"), ({"messages": 1}, "has the name 'messages'"),
                       ({"a b": 1}, "has the name 'a b'"), ({"x": object()}, "values must be JSON values")):
        with pytest.raises(EdgemtpError, match=match):
            ChatTemplate(THINKING, {}, "here", bad)
    # the CLI: JSON values where they parse, the same tokens as the Python API; a bundle with a template using one
    d = model_with_template(tiny_gemma3[1], tmp_path / "model", TINY + "{% if mood == 3 %} t9 t9{% endif %}")
    b = export(d, tmp_path / "b", capacity=64)
    want = Engine.load(b, chat_args={"mood": 3}).generate([{"role": "user", "content": "t3"}], 4)
    assert Engine.load(b).chat_prompt(chat) != Engine.load(b, chat_args={"mood": 3}).chat_prompt(chat)
    r = CliRunner().invoke(cli, ["generate", str(b), "--chat", "--prompt", "t3", "--chat-arg", "mood=3",
                                 "--max-new-tokens", "4", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["tokens"] == want.tokens, r.output
    for args, message in ((["--prompt", "t3", "--chat-arg", "mood=3"], "error: --chat-arg applies to --chat prompts"),
                          (["--chat", "--prompt", "t3", "--chat-arg", "mood"],
                           "error: --chat-arg 'mood': give NAME=VALUE"),
                          (["--chat", "--prompt", "t3", "--chat-arg", "messages=1"], "has the name 'messages'")):
        line = assert_one_line_error(CliRunner().invoke(cli, ["generate", str(b), *args]), message)
        assert line.startswith("error: --chat-arg"), line
    # NaN / Infinity are not JSON: the text (they were refused as a non-JSON number); bad ones named by the
    # option as typed (was '--chat-args {...}', a flag there is not)
    r = CliRunner().invoke(cli, ["generate", str(b), "--chat", "--prompt", "t3", "--chat-arg", "mood=NaN",
                                 "--chat-arg", "x=-Infinity", "--max-new-tokens", "4", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["tokens"] == \
        Engine.load(b, chat_args={"mood": "NaN"}).generate([{"role": "user", "content": "t3"}], 4).tokens, r.output
    for arg, message in (("messages=1", "error: --chat-arg 'messages=1' has the name 'messages'"),
                         ("mood=1e999", "error: --chat-arg 'mood=1e999' has mood=inf: values must be JSON values")):
        for command in (["generate", str(b), "--chat", "--prompt", "t3"], ["chat", str(b)]):
            r = CliRunner().invoke(cli, [*command, "--chat-arg", arg], input="t3\n")
            assert_one_line_error(r, message)
            assert "--chat-args" not in r.output, r.output
    with pytest.raises(EdgemtpError, match="chat_args \\(--chat-arg\\) set chat template variables, and the bundle "
                                           "has no chat template"):
        Engine.load(tiny_gemma3[2], chat_args={"mood": 3})


def test_a_chat_arg_given_twice_is_named(chat_bundle):
    """--chat-arg a=1 --chat-arg a=2: the last one won without a word (which one the user meant is theirs to say)."""
    for command in (["generate", str(chat_bundle), "--chat", "--prompt", "t3"], ["chat", str(chat_bundle)]):
        r = CliRunner().invoke(cli, [*command, "--chat-arg", "a=1", "--chat-arg", " a =2"], input="t3\n")
        assert_one_line_error(r, exact="--chat-arg ' a =2' sets a again (after --chat-arg 'a=1'): give each name once")


def test_chat_with_a_closed_standard_input_ends(chat_bundle):
    """A chat started with its standard input closed (sys.stdin None: a service's, pythonw's on Windows) ends as
    at the end of its input; it stopped with an AttributeError traceback."""
    code = "import sys; sys.stdin = None; from edgemtp.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code, "chat", str(chat_bundle)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr


def test_chat_with_a_standard_input_that_cannot_be_read_fails(chat_bundle, tmp_path):
    """`nohup` started at a terminal hands the chat a standard input it cannot read (opened write-only: EBADF):
    one error line and status 2, not a traceback, nor an error per read in an endless loop."""
    for flags in ([], ["--json"]):
        with open(tmp_path / "write-only", "wb") as unreadable:
            r = subprocess.run([sys.executable, "-m", "edgemtp", "chat", str(chat_bundle), *flags], stdin=unreadable,
                               capture_output=True, text=True, timeout=120)
        assert_one_line_error(r, "standard input")
        assert r.stdout == "", (flags, r.stdout)


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_command_with_the_shells_status(chat_bundle, signum, status):
    """A real SIGINT (Ctrl-C, `timeout -s INT`, a CI runner cancelling) ends a command with status 130 and a
    SIGTERM with 143, as a shell reports a process they killed, with no traceback and stdout holding only
    what was complete: the chat blocked on its pipe after one reply. A SIGINT gave click's status 1, which a
    script could not tell from a failure of the command's own."""
    # SIGINT at Python's own handler: pytest run as a shell script's background job (`pytest &`) ignores SIGINT,
    # as POSIX shells set such jobs, and its children inherit that (the case then ended with status 0)
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from edgemtp.cli import main; main()")
    p = subprocess.Popen([sys.executable, "-c", code, "chat", str(chat_bundle), "--json", "--max-new-tokens", "2"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        p.stdin.write(b"t3\n")
        p.stdin.flush()
        reply = p.stdout.readline()  # answered: the chat now waits for its next line
        p.send_signal(signum)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert json.loads(reply)["stats"]["decode_tokens"] == 1 and out == b""
    assert p.returncode == status and b"Traceback" not in err, err.decode()


@pytest.mark.parametrize("stop,status", [(KeyboardInterrupt, 130), (SystemExit(143), 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_mid_reply_ends_the_replys_line(chat_bundle, monkeypatch, stop, status):
    """A program's SIGINT, or SIGTERM (`timeout`, kill; exit_on_termination_signals's SystemExit), in the middle
    of a piped chat's reply: the chat ends with the shell's status, and the reply so far ends its line, as
    generate's text does; it was left without one (the shell's prompt after it)."""
    stream = Engine.stream
    full = Engine.load(chat_bundle).generate([{"role": "user", "content": "t3"}], 8, draft=None).text

    def interrupted(self, *args, **kwargs):
        for i, piece in enumerate(stream(self, *args, **kwargs)):
            if i == 3:
                raise stop
            yield piece

    monkeypatch.setattr(Engine, "stream", interrupted)
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--max-new-tokens", "8", "--no-draft"], input=b"t3\nt4\n")
    assert r.exit_code == status, r.output
    assert r.stdout.endswith("\n") and r.stdout.count("\n") == 1 and full.startswith(r.stdout[:-1]) and r.stdout[:-1]


@pytest.mark.parametrize("status", [143, 129], ids=["sigterm", "sighup"])
def test_sigterm_or_sighup_at_a_terminal_ends_the_chat(chat_bundle, monkeypatch, status):
    """SIGTERM / SIGHUP mid-reply with a person at the terminal end the chat with the shell's status (not as
    Ctrl-C there, which stops the reply and goes on): the reply so far ends its line. SIGHUP's terminal may be
    gone (EIO on each write): the chat still exits with 129, no OSError traceback."""
    import errno

    import click

    from edgemtp.cli import chat as chat_mod

    stream, echo, signalled = Engine.stream, click.echo, []
    full = Engine.load(chat_bundle).generate([{"role": "user", "content": "t3"}], 8, draft=None).text

    def interrupted(self, *args, **kwargs):
        for i, piece in enumerate(stream(self, *args, **kwargs)):
            if i == 3:
                signalled.append(True)
                raise SystemExit(status)  # exit_on_termination_signals's exit
            yield piece

    def gone(*args, **kwargs):
        if signalled and status == 129:
            raise OSError(errno.EIO, "Input/output error")
        echo(*args, **kwargs)

    monkeypatch.setattr(Engine, "stream", interrupted)
    monkeypatch.setattr(click, "echo", gone)
    monkeypatch.setattr(chat_mod, "stdin_is_terminal", lambda: True)
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--max-new-tokens", "8", "--no-draft"], input="t3\nt4\n")
    assert r.exit_code == status and isinstance(r.exception, SystemExit) and r.stderr == "", (r.exception, r.output)
    shown = r.stdout.removeprefix("> ")
    assert shown.endswith("\n" if status == 143 else "") and "\n" not in shown.rstrip("\n"), r.stdout
    assert full.startswith(shown.rstrip("\n")) and shown.rstrip("\n") != full and shown.rstrip("\n")


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_a_signal_inside_the_first_piece_s_echo_ends_its_line(chat_bundle, monkeypatch, terminal):
    """SIGTERM landing inside click.echo of a reply's first piece, after its text is out but before the reply
    recorded it: the line ends once (it was left unended: the chat ended it only for a reply holding a piece)."""
    import click

    from edgemtp.cli import chat as chat_mod

    echo, pieces = click.echo, []

    def signalled_inside(message=None, *args, **kwargs):
        echo(message, *args, **kwargs)
        if kwargs.get("nl") is False and message != "> ":  # a reply's piece (not the prompt), written
            pieces.append(message)
            raise SystemExit(143)  # exit_on_termination_signals's exit, from the handler run inside the echo

    monkeypatch.setattr(click, "echo", signalled_inside)
    monkeypatch.setattr(chat_mod, "stdin_is_terminal", lambda: terminal)
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--max-new-tokens", "8", "--no-draft"], input="t3\nt4\n")
    assert r.exit_code == 143 and len(pieces) == 1 and pieces[0], (r.exception, r.output)
    assert r.stdout == "> " * terminal + pieces[0] + "\n", r.stdout


@pytest.mark.parametrize("at", [0, 2], ids=["first", "third"])
def test_ctrl_c_inside_a_piece_s_echo_at_a_terminal_keeps_the_reply_as_shown(chat_bundle, monkeypatch, at):
    """Ctrl-C at a terminal landing inside click.echo of a reply's piece, after its text is out but before the
    reply recorded it: the reply stops with that piece, as shown, kept in the conversation, and the line ends.
    In the first piece it said "stopped before it began" and dropped the message though the piece was on the
    screen; in a later one the conversation kept the reply without the piece shown last."""
    import click

    from edgemtp.cli import chat as chat_mod

    echo, pieces = click.echo, []

    def interrupted_inside(message=None, *args, **kwargs):
        echo(message, *args, **kwargs)
        if kwargs.get("nl") is False and message != "> " and len(pieces) <= at:  # a reply's piece, written
            pieces.append(message)
            if len(pieces) == at + 1:
                raise KeyboardInterrupt  # from the handler run inside the echo

    monkeypatch.setattr(click, "echo", interrupted_inside)
    monkeypatch.setattr(chat_mod, "stdin_is_terminal", lambda: True)
    r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--max-new-tokens", "8", "--no-draft"],
                           input="t3 t4\nt5\n")
    assert r.exit_code == 0 and len(pieces) == at + 1 and all(pieces), (r.exception, r.output)
    assert "(reply stopped: the conversation keeps it as it stands" in r.stderr, r.stderr
    first = "".join(pieces)
    lines = [line.removeprefix("> ") for line in r.stdout.splitlines()]
    assert r.stdout.startswith("> " + first + "\n"), r.stdout
    fresh = Engine.load(chat_bundle)
    chat = [{"role": "user", "content": "t3 t4"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "t5"}]
    assert lines[1] == fresh.generate(chat, 8).text, r.output


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal (POSIX)")
@pytest.mark.parametrize("leave,status", [(signal.SIGTERM, 143), (getattr(signal, "SIGHUP", None), 129), ("eof", 0)],
                         ids=["sigterm", "sighup", "ctrl-d"])
def test_leaving_at_the_prompt_ends_its_line(chat_bundle, leave, status):
    """SIGTERM / SIGHUP, or Ctrl-D (the end of the input), while a chat at a terminal waits at its `> ` prompt:
    the chat ends with its status for them, and ends the prompt's line (a terminal ends none for them): the
    shell's prompt came after `> ` on the same line."""
    # the default actions: a pytest run under nohup ignores SIGHUP, and its children inherit that
    code = ("import signal; [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)]; "
            "from edgemtp.cli import main; main()")
    main_side, terminal = os.openpty()  # stdin a terminal: the chat shows its prompt
    p = subprocess.Popen([sys.executable, "-c", code, "chat", str(chat_bundle), "--max-new-tokens", "2"],
                         stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(terminal)
    try:
        prompt = p.stdout.read(2)  # shown: the chat waits for the line
        if leave == "eof":
            os.write(main_side, b"\x04")  # Ctrl-D at the line's start: the read gets the end of the input
        else:
            p.send_signal(leave)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        os.close(main_side)
    assert prompt + out == b"> \n" and p.returncode == status and err == b"", (prompt + out, p.returncode, err)


def test_a_byte_order_mark_opening_the_input_is_not_the_first_message_s_text(chat_bundle):
    """Messages piped from a file saved with a byte order mark (Notepad, PowerShell's -Encoding utf8): the mark
    went to the model as the first message's U+FEFF character (an unknown token here, one more token for
    Gemma); generate --prompt-file - drops it."""
    def replies(data: str):
        r = CliRunner().invoke(cli, ["chat", str(chat_bundle), "--json", "--max-new-tokens", "4", "--no-draft"],
                               input=data.encode())
        assert r.exit_code == 0, r.output
        return [json.loads(line)["tokens"] for line in r.stdout.splitlines()]

    plain = replies("t3 t4\nt5\n")
    assert replies("\ufefft3 t4\nt5\n") == plain
    first = Engine.load(chat_bundle).generate([{"role": "user", "content": "t3 t4"}], 4).tokens
    assert plain[0] == first


def test_a_template_file_s_byte_order_mark_is_not_template_text(tiny_gemma3, tmp_path):
    """A chat_template.jinja saved with a byte order mark (a Windows editor's UTF-8): the mark was copied into the
    bundle's template and rendered before the BOS token ('\\ufefft2': an unknown token here where the BOS was;
    with Gemma's tokenizer one more token before it). The bundle's template is the file's text without it."""
    d = model_with_template(tiny_gemma3[1], tmp_path / "model", TINY, where="chat_template.jinja")
    (d / "chat_template.jinja").write_bytes(b"\xef\xbb\xbf" + TINY.encode())
    b = export(d, tmp_path / "bundle", capacity=64)
    assert (b / "chat_template.jinja").read_text(encoding="utf-8") == TINY
    assert Engine.load(b).encode([{"role": "user", "content": "t3"}]) == [2, 5, 6, 3, 8, 5, 7]


def test_an_app_rendering_a_chat_by_the_documented_contract_gets_the_engines_prompt(chat_bundle):
    """docs/bundle-contract.md, Tokens, with jinja2 and tokenizers alone: the manifest's chat template, rendered
    with the special tokens it names (the template prints {{ bos_token }}) and encoded without special tokens."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import Tokenizer

    manifest = json.loads((chat_bundle / "edgemtp.json").read_text())
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string((chat_bundle / manifest["chat"]["template"]).read_text(encoding="utf-8"))
    chat = [{"role": "system", "content": "t9"}, {"role": "user", "content": "t3 t4"}]
    text = template.render(messages=chat, add_generation_prompt=True, **manifest["chat"]["special_tokens"])
    ids = Tokenizer.from_file(str(chat_bundle / manifest["tokenizer"])).encode(text, add_special_tokens=False).ids
    with Engine.load(chat_bundle) as engine:
        assert ids == engine.encode(chat)
