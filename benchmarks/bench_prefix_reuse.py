"""What reuse_prefix saves a conversation: each turn's prefill with and without the previous turn's cache.

    python benchmarks/bench_prefix_reuse.py BUNDLE [--turns 6] [--gen-tokens 32] [--threads 2] [--draft auto]

A conversation of --turns turns (user texts: paragraphs of this repository's README; as chat messages when
the bundle has a chat template, else one growing text): each turn's prompt is the whole conversation so
far. Two engines on the same bundle, one with Engine.load(reuse_prefix=True), take each turn in turn, and
the table shows per turn the prompt's length, the tokens each ran, the prefill (time to first token) of
each and their ratio, and whether both generated the same tokens.
"""

from __future__ import annotations

import edgemtp  # noqa: F401  (first: OpenBLAS's threads must not spin after numpy calls)

import argparse
import re
from pathlib import Path

from edgemtp.runtime.engine import Draft, Engine
from edgemtp.errors import script_main

ROOT = Path(__file__).resolve().parent.parent


def user_texts(n: int) -> list[str]:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", (ROOT / "README.md").read_text())
                  if 200 < len(p.strip()) < 700 and not p.lstrip().startswith(("|", "```"))]
    return [f"Explain this: {p}" for p in paragraphs[:n]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft", default="auto", help="auto | mtp | hybrid | lookup | none")
    args = ap.parse_args()
    mtp = args.draft in ("mtp", "hybrid") or None
    reuse = Engine.load(args.bundle, threads=args.threads, reuse_prefix=True, mtp=mtp)
    fresh = Engine.load(args.bundle, threads=args.threads, mtp=mtp)
    draft = None if args.draft == "none" else Draft(args.draft, 4)
    chat = reuse.chat_template is not None
    messages, text = [], ""
    print(f"{'turn':>4} {'prompt':>7} {'ran: reuse':>10} {'fresh':>6} {'prefill ms: reuse':>18} {'fresh':>8} "
          f"{'ratio':>7} {'same':>5}")
    for turn, said in enumerate(user_texts(args.turns), 1):
        if chat:
            messages.append({"role": "user", "content": said})
            prompt = list(messages)
        else:
            text += ("\n\n" if text else "") + said + "\n"
            prompt = text
        # the fresh engine first: the reusing one must not be helped by a warmer cache of the machine's own
        want = fresh.generate(prompt, args.gen_tokens, draft=draft)
        got = reuse.generate(prompt, args.gen_tokens, draft=draft)
        a, b = got.stats, want.stats
        print(f"{turn:4d} {a.prefill_tokens + a.cached_tokens:7d} {a.prefill_tokens:10d} {b.prefill_tokens:6d} "
              f"{a.prefill_s * 1e3:18.1f} {b.prefill_s * 1e3:8.1f} {b.prefill_s / a.prefill_s:6.1f}x "
              f"{str(got.tokens == want.tokens):>5}")
        if chat:
            messages.append({"role": "assistant", "content": got.text})
        else:
            text += got.text


if __name__ == "__main__":
    script_main(main)
