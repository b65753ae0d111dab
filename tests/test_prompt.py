import pytest

from sphinx_edge import layout
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


def test_reexported_from_layout():
    assert layout.format_prompt is format_prompt
    assert layout.SYSTEM_PROMPT == SYSTEM
