"""The model's chat template, copied into the bundle so that the runtime can format chat prompts.

Where a Hugging Face style checkpoint keeps it: `chat_template.jinja` (transformers 4.43 and later),
`chat_template.json` (a multimodal processor's), or `tokenizer_config.json`'s `chat_template` (a string, or a
list of named templates of which "default" is the one apply_chat_template uses). `import-gguf` writes the
GGUF's `tokenizer.chat_template` there. The special tokens (`bos_token`...) the template may print come from
tokenizer_config.json or special_tokens_map.json."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgemtpError, not_a_file
from ..json_file import read_json

FILE = "chat_template.jinja"  # its name in the bundle
# the named special tokens transformers' special_tokens_map holds, which apply_chat_template passes to the template
SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _json(path: Path, what: str) -> dict:
    """The JSON object in `path`; {} where nothing is there. `what`: what the file holds, for a refusal."""
    if not path.is_file():
        if path.exists():  # a directory or a FIFO: read as absent, its template or special tokens were lost
            raise EdgemtpError(f"{path}: {not_a_file(path)} ({what})")
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise EdgemtpError(f"{path}: not a JSON object")
    return data


def _token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def find(model_dir: Path) -> tuple[str, dict[str, str], str] | None:
    """(template, special tokens, where it was found) of `model_dir`; None when it has no chat template."""
    model_dir = Path(model_dir)
    config = _json(model_dir / "tokenizer_config.json", "the model's tokenizer settings")
    jinja = model_dir / FILE
    if jinja.is_file():
        try:  # utf-8-sig: a byte order mark (a Windows editor's) is no template text, else rendered before the BOS
            template, source = jinja.read_text(encoding="utf-8-sig"), str(jinja)
        except UnicodeDecodeError:
            raise EdgemtpError(f"{jinja}: not UTF-8 text") from None
    elif jinja.exists():  # a directory or a FIFO: the template below would be used instead of this one
        raise EdgemtpError(f"{jinja}: {not_a_file(jinja)} (the model's chat template)")
    elif "chat_template" in (processor := _json(model_dir / "chat_template.json", "the model's chat template")):
        template, source = processor["chat_template"], str(model_dir / "chat_template.json")
    elif "chat_template" in config:
        template, source = config["chat_template"], str(model_dir / "tokenizer_config.json")
    else:
        return None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        raise EdgemtpError(f"{source}: chat_template is not a template (a string, or a list of named templates "
                           "with a 'default')")
    tokens = _json(model_dir / "special_tokens_map.json", "the model's special tokens")
    special = {k: t for k in SPECIAL if (t := _token(config.get(k, tokens.get(k)))) is not None}
    # and a model's own named ones (Gemma 3's boi_token, image_token...), which the special_tokens_map holds too;
    # else a template printing one wrote nothing there, as for sep_token, cls_token and mask_token before
    extra = config.get("extra_special_tokens")
    for k, v in (extra.items() if isinstance(extra, dict) else ()):
        if isinstance(k, str) and (t := _token(v)) is not None:
            special.setdefault(k, t)
    _check_parses(template, source)
    return template, special, source


def _check_parses(template: str, source: str) -> None:
    """A template that does not parse fails the export, not the first chat prompt; without jinja2 (an
    optional dependency of the runtime's chat prompts) it is copied unchecked."""
    try:
        import jinja2  # noqa: F401
    except ImportError:
        return
    from ..runtime.chat import compile_template

    compile_template(template, source)


def write(found: tuple[str, dict[str, str], str] | None, bundle_tmp: Path) -> dict | None:
    """Writes find()'s template into the bundle being written; the manifest's "chat" entry, or None."""
    if found is None:
        return None
    template, special, _ = found
    (bundle_tmp / FILE).write_text(template, encoding="utf-8")
    return {"template": FILE, "special_tokens": special}
