import pytest

from sphinx_edge.prompt import (
    STOP_STRINGS,
    SYSTEM_PROMPT,
    VQA_SUFFIX,
    conversation_pieces,
    format_prompt,
)

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def test_constants():
    assert SYSTEM_PROMPT == SYSTEM
    assert STOP_STRINGS == ("\n###",)
    assert VQA_SUFFIX == "\nAnswer the question using a single word or phrase."


def test_one_question_generation_prompt():
    assert format_prompt([("What is this?", None)]) == SYSTEM + "\n\n### Human: What is this?\n### Assistant:"


def test_one_answered_turn():
    assert format_prompt([("Q?", "A cat.")]) == SYSTEM + "\n\n### Human: Q?\n### Assistant: A cat.\n###"


def test_two_turns_exact():
    turns = [("What is it?", "A dog."), ("What colour?" + VQA_SUFFIX, None)]
    expected = (
        SYSTEM
        + "\n\n### Human: What is it?\n### Assistant: A dog.\n###"
        + " Human: What colour?\nAnswer the question using a single word or phrase.\n### Assistant:"
    )
    assert format_prompt(turns) == expected


def test_pieces_answered():
    turns = [("q1", "a1"), ("q2", "a2")]
    pieces = conversation_pieces(turns)
    assert pieces == [
        (SYSTEM + "\n\n### Human: q1\n### Assistant:", False),
        (" a1\n###", True),
        (" Human: q2\n### Assistant:", False),
        (" a2\n###", True),
    ]
    assert "".join(t for t, _ in pieces) == format_prompt(turns)
    # The supervised text ends with the stop string: the model learns to stop.
    assert all(t.endswith(STOP_STRINGS[0]) for t, sup in pieces if sup)


def test_pieces_generation_prompt():
    turns = [("q1", "a1"), ("q2", None)]
    pieces = conversation_pieces(turns)
    assert [sup for _, sup in pieces] == [False, True, False]
    assert "".join(t for t, _ in pieces) == format_prompt(turns)
    assert format_prompt(turns).endswith("### Human: q2\n### Assistant:")


def test_invalid_turns():
    with pytest.raises(ValueError, match="at least one"):
        format_prompt([])
    with pytest.raises(ValueError, match="only the last"):
        conversation_pieces([("q1", None), ("q2", "a2")])


# --- arbitrary unicode (hypothesis) ---------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=60)  # surrogates too


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_check_text_accepts_exactly_the_nonblank_text_utf8_can_carry(text):
    from sphinx_edge.prompt import check_text

    encodable = not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    try:
        assert check_text(text, "--prompt") == text
        assert encodable and text.strip()
    except ValueError as e:
        assert "--prompt" in str(e) and (not encodable or not text.strip())


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_the_bundled_tokenizer_round_trips_any_text_or_refuses_it_clearly(text):
    from sphinx_edge.bundled import WEIGHTS
    from sphinx_edge.tokenizer import Tokenizer, TokenizerError

    tok = Tokenizer(WEIGHTS / "nano" / "tokenizer.model")
    try:
        ids = tok.encode(text, bos=True)
    except TokenizerError as e:
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text) and "UTF-8" in str(e)
        return
    assert all(0 <= i < tok.vocab_size for i in ids) and ids[0] == tok.bos_id
    assert tok.decode(ids) == text.lstrip(" ") or tok.decode(ids) == text  # the dummy prefix's space
