"""Token choice and streamed detokenisation with stop strings. Torch-free: the runtime shares it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sphinx_edge.prompt import STOP_STRINGS


def choose_token(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
                 rng: np.random.Generator | None = None) -> int:
    """Greedy when temperature is 0; otherwise nucleus sampling over the softmax at `temperature`."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature <= 0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p  # always keeps the most likely token
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


class TextStream:
    """Detokenises generated ids incrementally; holds back text that may start a stop string.

    `push(id)` returns the newly final text; `stopped` turns True once a stop string appears (the
    stop string and anything after it are never emitted).
    """

    def __init__(self, decode, stop_strings: Sequence[str] = STOP_STRINGS) -> None:
        self._decode = decode
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""  # what has been emitted so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self._decode(self.ids)
        hits = [i for i in (full.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(full[: min(hits)])
        safe = len(full)
        if full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            safe -= 1
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(full)), 0, -1):
                if full.endswith(stop[:n]):
                    safe = min(safe, len(full) - n)
                    break
        return self._emit(full[:safe])

    def finish(self) -> str:
        """The held-back remainder at the end of generation (no stop string came)."""
        return "" if self.stopped else self._emit(self._decode(self.ids).rstrip("\ufffd"))

    def _emit(self, upto: str) -> str:
        new = upto[len(self.text):] if upto.startswith(self.text) else ""
        self.text = upto if upto.startswith(self.text) else self.text
        return new


def decode_loop(
    logits: np.ndarray,
    feed: Callable[[int], np.ndarray],
    decode: Callable[[list[int]], str],
    eos_id: int,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: np.random.Generator | None = None,
    on_text: Callable[[str], None] | None = None,
) -> tuple[TextStream, str]:
    """The generation loop every backend shares: choose a token from `logits`, stream its text,
    `feed(token)` it to get the next logits; until EOS, a stop string or `max_new_tokens`.

    Returns the stream (text and ids) and the stop reason: "eos", "stop" or "length".
    """
    stream = TextStream(decode)
    stop_reason = "length"
    for step in range(max_new_tokens):
        token = choose_token(logits, temperature, top_p, rng)
        if token == eos_id:
            stop_reason = "eos"
            break
        new_text = stream.push(token)
        if new_text and on_text:
            on_text(new_text)
        if stream.stopped:
            stop_reason = "stop"
            break
        if step + 1 < max_new_tokens:
            logits = feed(token)
    tail = stream.finish()
    if tail and on_text:
        on_text(tail)
    return stream, stop_reason
