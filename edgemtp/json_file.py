"""Reading a JSON file the user gave (config.json, a manifest, generation_config.json ...) with one clear error."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import EdgemtpError


def read_json(path: Path):
    """The JSON value in `path`, or an EdgemtpError naming it: not JSON, not UTF-8, a number past Python's
    4,300 digits (a ValueError), or arrays and objects nested deeper than the parser recurses."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: JSONDecodeError too
        raise EdgemtpError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise EdgemtpError(f"{path}: not valid JSON (nested too deeply)") from None
