"""The conv_v1_2 prompt template of LLaMA2-Accessory (docs/ARCHITECTURE.md, section 2). Torch-free.

The text is the "SINGLE" separator style:

    {SYSTEM}\n\n### Human: {q1}\n### Assistant: {a1}\n### Human: {q2}\n### Assistant:

The image tokens are not part of the text: they are spliced in right after BOS, before the
system prompt (see `layout.image_segments`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# Every message ends with this separator; generation stops on it (or on EOS).
STOP_STRINGS = ("\n###",)
# Appended to the question for VQA-style benchmarks (short answers).
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."

Turn = tuple[str, str | None]


class ContextOverflowError(ValueError):
    """The prompt (image tokens included) does not fit the model's context."""


def conversation_pieces(turns: Sequence[Turn]) -> list[tuple[str, bool]]:
    """The prompt text cut into (text, supervised) pieces; "".join(texts) == format_prompt(turns).

    A piece is supervised exactly when it is an assistant answer, written as " {a}\\n###": the
    leading space belongs to the answer (SentencePiece merges it into the first word, as
    LLaMA2-Accessory's label masking assumes) and the closing separator is supervised so that
    the model learns to stop. Only the last answer may be None (the generation prompt).
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    pieces: list[tuple[str, bool]] = []
    text = SYSTEM_PROMPT + "\n\n###"
    for i, (question, answer) in enumerate(turns):
        text += f" Human: {question}\n### Assistant:"
        if answer is None:
            if i != len(turns) - 1:
                raise ValueError(f"only the last answer may be None (turn {i} of {len(turns)})")
            continue
        pieces.append((text, False))
        pieces.append((f" {answer}\n###", True))
        text = ""
    if text:
        pieces.append((text, False))
    return pieces


def format_prompt(turns: Sequence[Turn]) -> str:
    """The whole conversation; ends with " Assistant:" when the last answer is None."""
    return "".join(text for text, _ in conversation_pieces(turns))


def turns_to_drop(turns: Sequence[Turn], question: str, length: Callable[[Sequence[Turn]], int], budget: int) -> int:
    """How many of the oldest `turns` a conversation drops so that `length(kept turns + question)`
    fits `budget` tokens: 0 when it already fits, len(turns) when even the question alone does not."""
    for dropped in range(len(turns) + 1):
        if length([*turns[dropped:], (question, None)]) <= budget:
            return dropped
    return len(turns)


def answer_room(max_new_tokens: int, context: int) -> int:
    """Tokens a chat keeps free for the next answer when it drops old turns: the answer's budget,
    but at most a quarter of the context (a long budget must not erase the whole history)."""
    return max(1, min(max_new_tokens, context // 4))


def check_text(text: str, what: str) -> str:
    """`text` if it is a usable question; ValueError naming `what` if it is empty or not valid UTF-8."""
    if not text.strip():
        raise ValueError(f"{what} is empty")
    check_utf8(text, what)
    return text


def check_utf8(text: str, what: str, error: type[ValueError] = ValueError) -> None:
    """`error` naming `what` unless UTF-8 can carry `text`: undecodable bytes in argv or stdin arrive
    in Python as lone surrogates, which SentencePiece's binding would fail on with a RuntimeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{what} is not valid UTF-8 text (undecodable bytes at character {e.start}); "
                    "check the terminal's or file's encoding") from None
