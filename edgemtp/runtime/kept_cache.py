"""Engine.load(reuse_prefix=True): the KV cache a one-prompt generation leaves behind, kept for the next one.

A chat's next turn repeats the whole conversation so far as its prompt; the cache the last turn left holds
those positions already, so the next generation runs only what its prompt adds."""

from __future__ import annotations

import contextlib
import threading

from .kv_cache import KVCache


class KeptCache:
    """The last generation's one-row cache and the token ids its positions hold (`held`), when `enabled`."""

    def __init__(self, target, enabled: bool = False):
        self.target, self.enabled = target, enabled
        self.held: tuple[KVCache, list[int]] | None = None
        self._lock = threading.Lock()  # two threads' generations must not both take the one kept cache

    def take(self, prompt_ids: list[int]) -> tuple[KVCache, int]:
        """A one-row cache for `prompt_ids` and how many of their first positions it holds already: the kept
        cache rolled back to where its tokens and the prompt part (one token at least is left to run: its
        logits pick the first new token), else a new one."""
        with self._lock:
            kept, self.held = self.held, None  # taken: a generation that fails leaves none behind
        if kept is None:
            return self.target.new_cache(1), 0
        cache, ids = kept
        n = 0
        for a, b in zip(ids, prompt_ids[:-1]):
            if a != b:
                break
            n += 1
        cache.rollback(0, n)
        return cache, n

    @contextlib.contextmanager
    def keeping(self, cache: KVCache, prompt_ids: list[int], generated: list[int]):
        """Keeps `cache` for the next generation once this one ends, its consumer stops reading, or Ctrl-C
        stops it (its positions then hold prompt + generated tokens, the last one not yet run); not after an
        error, which may have left the generation's own state half done.

        A KeyboardInterrupt mostly lands inside a pass (Python raises it when ONNX Runtime's run returns), and the
        cache is still right to keep: a pass writes only at and after a row's length and moves the length once
        it ran, and `generated` holds only tokens whose round committed, so the first min(length, ids)
        positions hold those ids (_keep). Dropping it made `edgemtp chat`'s next turn after a Ctrl-C run the
        whole conversation again."""
        try:
            yield
        except (GeneratorExit, KeyboardInterrupt):
            self._keep(cache, prompt_ids + generated)
            raise
        self._keep(cache, prompt_ids + generated)

    def _keep(self, cache: KVCache, ids: list[int]) -> None:
        if self.enabled:
            n = min(int(cache.lengths[0]), len(ids))  # a stop string may end the text inside a verified run
            cache.rollback(0, n)
            # the IOBindings Target kept over the cache hold each pass shape's last outputs: a [1, width, vocab]
            # logits array per verify width (29 MB on Gemma 3 270M at an adaptive K = 8), held between calls for
            # nothing; the next generation binds afresh, as one over a new cache does (~0.6 ms a shape)
            cache.passes.clear()
            self.held = (cache, ids[:n])
            # Engine.reuse_prefix switched off from another thread since the check above: it clears `enabled`, then
            # lets go of `held`, and may have done both before this store, which then stayed held (and the next
            # generation ran over it with keeping off)
            if not self.enabled:
                self.held = None
