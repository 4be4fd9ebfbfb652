"""Rebuild a Hugging Face tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no `tokenizer.json`, only llama.cpp's description of the vocabulary. Two kinds matter:

* `tokenizer.ggml.model == "llama"`: SentencePiece BPE (Gemma, Llama 2). The file stores pieces and
  scores but no merges. SentencePiece merges, at each step, the adjacent pair whose concatenation is the
  best-scoring piece, so the equivalent HF merge list is every split `(left, right)` of every piece,
  ranked by the score of the merged piece.
* `tokenizer.ggml.model == "gpt2"`: byte-level BPE (SmolLM2, Qwen2, Qwen3) with explicit merges; what
  differs between models is the pre-tokenizer regex, named by `tokenizer.ggml.pre`.

Token types (llama.cpp's `LLAMA_TOKEN_TYPE_*`): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from edgemtp.errors import EdgemtpError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) for byte-level vocabularies that we rebuild:
# GPT-2's regex, optionally preceded by splitting off every digit ("smollm": `\p{N}`, then GPT-2's),
# Qwen2's own regex (Qwen2 and Qwen3: one digit at a time, case-insensitive contractions) after NFC, as
# transformers' Qwen2Tokenizer builds it, or Llama 3's (the same with digits by up to three, no NFC: the
# Split its tokenizer.json runs before a ByteLevel without its own regex; llama.cpp's names for it).
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3")
_PRE = ("gpt2", "smollm", "qwen2", *_LLAMA3)
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_tokenizer(meta: dict) -> Tokenizer:
    """The `tokenizers.Tokenizer` that the GGUF metadata `meta` (field name -> value) describes."""
    check_fields(meta)
    try:
        return _build(meta)
    except EdgemtpError:
        raise
    except Exception as e:  # the tokenizers library raises a bare Exception (a merge of unknown tokens...)
        raise EdgemtpError(f"the tokenizer.ggml.* fields do not make a tokenizer ({' '.join(str(e).split())[:200]})") \
            from None


def check_fields(meta: dict) -> None:
    """The kinds of the tokenizer fields, named before the tokenizers library meets them (and, by the importer,
    before its progress bar is drawn: an error is then the one line on standard error)."""
    if "tokenizer.ggml.tokens" not in meta:
        raise EdgemtpError("GGUF field tokenizer.ggml.tokens is missing: the file has no vocabulary")

    def strings(v) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def numbers(v) -> bool:
        return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

    tokens = meta["tokenizer.ggml.tokens"]
    n = len(tokens) if isinstance(tokens, list) else 0
    merges, scores, types = (meta.get(f"tokenizer.ggml.{k}") for k in ("merges", "scores", "token_type"))
    checks = {"tokenizer.ggml.tokens": (strings(tokens) and n > 0, "a non-empty list of strings"),
              "tokenizer.ggml.merges": (merges is None or (strings(merges) and all(" " in m for m in merges)),
                                        "a list of 'left right' strings"),
              "tokenizer.ggml.scores": (scores is None or (numbers(scores) and len(scores) == n),
                                        "one number per token"),
              "tokenizer.ggml.token_type": (types is None or (numbers(types) and len(types) == n),
                                            "one token type per token"),
              "tokenizer.chat_template": (isinstance(meta.get("tokenizer.chat_template", ""), str),
                                          "a string (a Jinja template)")}
    for name in ("add_bos_token", "add_eos_token", "add_space_prefix"):  # a GGUF bool: "no" was read as true
        value = meta.get(f"tokenizer.ggml.{name}")
        checks[f"tokenizer.ggml.{name}"] = (value is None or isinstance(value, bool), "a bool (true or false)")
    for name in ("bos", "eos", "unknown", "padding", "eot", "eom"):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        checks[f"tokenizer.ggml.{name}_token_id"] = (
            value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n),
            f"a token id below the vocabulary's {n}")
    for key, (ok, what) in checks.items():
        if not ok:
            value = meta.get(key)
            shown = f"[{len(value)} entries]" if isinstance(value, list) and len(value) > 8 else repr(value)
            raise EdgemtpError(f"GGUF field {key} = {shown[:120]} must be {what}")


def _build(meta: dict) -> Tokenizer:
    kind, tokens, types = meta.get("tokenizer.ggml.model"), meta["tokenizer.ggml.tokens"], _token_types(meta)
    if kind == "llama":
        tok = _sentencepiece_bpe(meta, tokens, types)
    elif kind == "gpt2":
        tok = _byte_level_bpe(meta)
    else:
        raise EdgemtpError(f"GGUF field tokenizer.ggml.model {kind!r} is not supported (supported: 'llama', 'gpt2')")
    _add_special_tokens(tok, tokens, types)
    tok.post_processor = _post_processor(meta, byte_level=kind == "gpt2")
    return tok


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int]) -> Tokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise EdgemtpError("GGUF field tokenizer.ggml.scores is missing; a SentencePiece vocabulary needs it")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores, types),
                               unk_token=_special(meta, "unknown"), fuse_unk=True, byte_fallback=True))
    # Spaces are spelled "▁" and the text between added tokens is one BPE "word", as in HF's
    # GemmaTokenizer. SentencePiece's "dummy prefix": Gemma's files say add_space_prefix=False; with it
    # (Llama 2) each such stretch gets a leading "▁", as llama.cpp and HF's legacy Llama tokenizer do.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE)] * prefix + [normalizers.Replace(" ", SPACE)])
    strip = [decoders.Strip(content=" ", left=1, right=0)] * prefix
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every `(left, right)` whose concatenation is a normal piece, best merged-piece score first.

    Only normal pieces take part: control, byte and user-defined ones never come out of a merge
    (user-defined ones are matched whole, as added tokens, before BPE runs).
    """
    normal = {tok: i for i, tok in enumerate(tokens) if types[i] == NORMAL}
    # cut only where both halves have the length of some piece: every cut of a (hostile) piece of 200,000
    # characters, each half copied, took 16 s; real pieces are at most a few dozen characters
    lengths = sorted({len(piece) for piece in normal})
    normal_lengths = set(lengths)
    ranked = []
    for piece, i in normal.items():
        for cut in lengths:
            if cut >= len(piece):
                break
            if len(piece) - cut not in normal_lengths:
                continue
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, normal[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _byte_level_bpe(meta: dict) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE:
        raise EdgemtpError(f"GGUF field tokenizer.ggml.pre {pre!r} is not supported "
                           f"(supported: {', '.join(sorted(_PRE))})")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise EdgemtpError("GGUF field tokenizer.ggml.merges is missing; a byte-level BPE vocabulary needs it")
    vocab = {tok: i for i, tok in enumerate(meta["tokenizer.ggml.tokens"])}
    # Llama 3's pieces come from tiktoken, which takes a word in the vocabulary whole whether or not the merges
    # reach it: its tokenizer.json says ignore_merges, and llama.cpp sets it for these pre-tokenizer names
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                               ignore_merges=pre in _LLAMA3))
    if pre == "qwen2" or pre in _LLAMA3:
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
        regex = QWEN2_REGEX if pre == "qwen2" else LLAMA3_REGEX
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                       use_regex=False)])
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        digits = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
        tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_special_tokens(tok: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens and the unknown token (Llama 2's, Mistral's and Phi-3's "<unk>", typed UNKNOWN, not
    CONTROL) become special added tokens, user-defined ones plain added tokens.

    All are matched whole in the raw text before BPE runs, as llama.cpp does (SentencePiece too, for
    user-defined ones; HF's tokenizer.json lists "<unk>" as a special added token). llama.cpp already
    spelled user-defined pieces with real spaces (Gemma's runs of spaces are stored as "  ", not "▁▁"),
    so they match before spaces become "▁".
    """
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])


def _post_processor(meta: dict, byte_level: bool):
    """BOS/EOS as the file's add_bos_token/add_eos_token say (llama.cpp: BOS on by default for SentencePiece
    and llama-bpe)."""
    bos, eos = _special(meta, "bos"), _special(meta, "eos")
    add_bos = _adds(meta, "bos", byte_level) and bos is not None
    add_eos = _adds(meta, "eos", byte_level) and eos is not None
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    if add_bos or add_eos:
        single = f"{bos} " * add_bos + "$A" + f" {eos}" * add_eos
        second = f"{bos}:1 " * add_bos + "$B:1" + f" {eos}:1" * add_eos
        used = {bos: _special_id(meta, "bos")} if add_bos else {}
        used.update({eos: _special_id(meta, "eos")} if add_eos else {})
        steps.append(processors.TemplateProcessing(single=single, pair=f"{single} {second}",
                                                   special_tokens=list(used.items())))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)


def _adds(meta: dict, name: str, byte_level: bool) -> bool:
    # llama.cpp's defaults where the file says nothing: BOS for SentencePiece and for Llama 3's pre-tokenizer
    default = name == "bos" and (not byte_level or meta.get("tokenizer.ggml.pre") in _LLAMA3)
    return bool(meta.get(f"tokenizer.ggml.add_{name}_token", default))


def write_tokenizer_files(meta: dict, out_dir: Path, context_length: int | None = None) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    tok = build_tokenizer(meta)
    # written by Python, not tok.save: its errors (a full disk) are then an OSError, not a bare Exception
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    specials = {f"{name}_token": _special(meta, key)
                for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    specials = {k: v for k, v in specials.items() if v is not None}
    byte_level = meta.get("tokenizer.ggml.model") == "gpt2"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # use tokenizer.json exactly as written
        **specials,
        "add_bos_token": _adds(meta, "bos", byte_level),
        "add_eos_token": _adds(meta, "eos", byte_level),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length or 1_000_000_000,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", specials)
    return tok


def _token_types(meta: dict) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type")
    return list(types) if types is not None else [NORMAL] * len(meta["tokenizer.ggml.tokens"])


def _special_id(meta: dict, name: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    return None if value is None else int(value)


def _special(meta: dict, name: str) -> str | None:
    """The text of the `name` (bos, eos, unknown, padding) token, or None when the file names none."""
    token_id = _special_id(meta, name)
    tokens = meta["tokenizer.ggml.tokens"]
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise EdgemtpError(f"GGUF field tokenizer.ggml.{name}_token_id = {token_id} is outside the vocabulary")
    return tokens[token_id]


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
