"""A user's text file's bytes as text, or one message saying where they are not: the prompt files and standard
input of the CLI, and export's --calibration file."""

from __future__ import annotations

import codecs

from .errors import EdgemtpError


def utf8_text(data: bytes, what: str, errors: str = "strict") -> str:
    """`data` decoded as UTF-8, or an EdgemtpError naming `what` and where it is not: the first byte that is not
    UTF-8, by its offset (a Latin-1 or cp1252 file's accent, somewhere in a long file), that it is UTF-16 (by
    its byte order mark: PowerShell 5's `>`, Notepad's "Unicode"), whose first byte is no clue, or its first NUL
    byte (a binary file, or UTF-16 without a byte order mark: valid UTF-8 all the same). `errors` "replace":
    bytes that are not UTF-8 become U+FFFD instead (a calibration text, where a stray accent changes nothing)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise EdgemtpError(f"{what}: UTF-16 text, not UTF-8 (save it as UTF-8)")
    try:
        text = data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise EdgemtpError(f"{what}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if (nul := data.find(b"\0")) >= 0:
        raise EdgemtpError(f"{what}: not text (a NUL byte at offset {nul})")
    return text
