"""The identity set: well-formed conversations, a consistent name and maker, held-out questions really held out."""

import re

import pytest

from camelid.errors import CamelidError
from camelid.data.identity import (
    DEFAULT_CREATOR,
    DEFAULT_NAME,
    general_questions,
    heldout_identity_questions,
    identity_conversations,
)

OTHER_PRODUCTS = ["ChatGPT", "GPT-4", "Claude", "Gemini", "Bard", "Vicuna", "LLaMA", "SmolLM"]


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, spaces collapsed: 'Are you ChatGPT?' == 'are you chatgpt'."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def training_user_messages(convs) -> set[str]:
    return {normalise(m["content"]) for c in convs for m in c if m["role"] == "user"}


def replies_without_name(convs, name: str) -> list[tuple[list[dict], int]]:
    """(conversation, index) of every assistant reply that does not say `name`."""
    return [
        (c, i)
        for c in convs
        for i, m in enumerate(c)
        if m["role"] == "assistant" and name.lower() not in m["content"].lower()
    ]


def test_counts_are_in_range():
    assert 60 <= len(identity_conversations()) <= 100
    assert len(heldout_identity_questions()) >= 12
    assert 3 <= len(general_questions()) <= 8


@pytest.mark.parametrize("conv", identity_conversations(), ids=lambda c: c[-2]["content"][:40])
def test_conversation_alternates_and_ends_with_assistant(conv):
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"].strip() for m in conv)
    turns = conv[1:] if conv[0]["role"] == "system" else conv
    assert turns, "a system message alone is not a conversation"
    assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
    assert len(turns) % 2 == 0


def test_every_identity_answer_says_the_name():
    convs = identity_conversations()
    unnamed = replies_without_name(convs, DEFAULT_NAME)
    # The only replies allowed to skip the name answer an ordinary task asked after the identity question.
    assert unnamed, "expected a few multi-turn conversations that move on to a normal task"
    for conv, i in unnamed:
        assert i == len(conv) - 1, conv
        assert any(DEFAULT_NAME in m["content"] for m in conv[:i] if m["role"] == "assistant"), conv


def test_answers_about_the_maker_name_the_maker():
    asked = 0
    for conv in identity_conversations():
        for q, a in zip(conv, conv[1:]):
            if q["role"] == "user" and re.search(r"\b(made|creat|train|buil|develop)", q["content"], re.I):
                asked += 1
                assert DEFAULT_CREATOR.lower() in a["content"].lower(), (q, a)
    assert asked >= 10


def test_never_claims_to_be_another_product():
    products = "|".join(map(re.escape, OTHER_PRODUCTS))
    # "no soy ChatGPT" is a denial; "I'm not", "je ne suis pas", "ich bin nicht" never match.
    claim = re.compile(rf"(?<!no )\b(I'm|I am|je suis|soy|ich bin) ({products})\b", re.I)
    for conv in identity_conversations():
        for m in conv:
            if m["role"] == "assistant":
                assert not claim.search(m["content"]), m["content"]


def test_heldout_and_general_questions_are_not_trained_on():
    trained = training_user_messages(identity_conversations())
    heldout = heldout_identity_questions()
    assert len({normalise(q) for q in heldout}) == len(heldout)
    for q in heldout + general_questions():
        assert normalise(q) not in trained, q


def test_covers_registers_languages_system_and_multi_turn():
    convs = identity_conversations()
    users = [m["content"] for c in convs for m in c if m["role"] == "user"]
    replies = " ".join(m["content"] for c in convs for m in c if m["role"] == "assistant")
    assert any(u == u.lower() and not u.endswith("?") for u in users), "some casual lowercase questions"
    for product in OTHER_PRODUCTS:
        assert any(product.lower() in u.lower() for u in users), product
    for answered_in in ["Je suis", "Soy", "Ich bin"]:
        assert answered_in in replies
    assert any(c[0] == {"role": "system", "content": "You are a helpful assistant."} for c in convs)
    assert sum(len(c) >= 4 for c in convs) >= 6


def test_stable_and_without_duplicates():
    convs = identity_conversations()
    assert convs == identity_conversations()
    keys = [tuple((m["role"], m["content"]) for m in c) for c in convs]
    assert len(set(keys)) == len(keys)


def test_custom_name_and_creator_replace_the_defaults_everywhere():
    name, creator = "Nimbus", "the Orbit Lab"
    convs = identity_conversations(name, creator)
    assert len(convs) == len(identity_conversations())
    texts = [m["content"] for c in convs for m in c] + heldout_identity_questions(name, creator)
    for text in texts:
        assert "camelid" not in text.lower(), text
        assert "{" not in text, text
    assert any(name in q for q in heldout_identity_questions(name, creator))
    assert any(creator in q for q in heldout_identity_questions(name, creator))
    unnamed = replies_without_name(convs, name)
    assert all(i == len(c) - 1 for c, i in unnamed)
    assert len(unnamed) == len(replies_without_name(identity_conversations(), DEFAULT_NAME))
    assert sum(creator.lower() in m["content"].lower() for c in convs for m in c) >= len(convs) // 2


def test_braces_in_a_custom_name_are_literal():
    convs = identity_conversations("{creator}", "Acme")
    assert "I'm {creator}, an AI assistant made by Acme." in [m["content"] for c in convs for m in c]


@pytest.mark.parametrize("name, creator", [("", "Acme"), ("Nimbus", "  ")])
def test_empty_name_or_creator_is_a_user_error(name, creator):
    with pytest.raises(CamelidError):
        identity_conversations(name, creator)


def test_replay_prompts_are_distinct_from_the_evaluation_questions():
    from camelid.data.identity import replay_prompts

    def norm(text):
        return "".join(ch for ch in text.lower() if ch.isalnum() or ch == " ").strip()

    replay = {norm(p) for p in replay_prompts()}
    assert len(replay) == len(replay_prompts()) >= 20
    assert not replay & {norm(q) for q in general_questions()}
    assert not replay & {norm(q) for q in heldout_identity_questions()}


def test_an_identity_is_a_name_and_an_optional_creator():
    from camelid.data.identity import DEFAULT_CREATOR, parse_identity

    assert parse_identity(" Nimbus , the Orbit Lab ") == ("Nimbus", "the Orbit Lab")
    assert parse_identity("Nimbus") == parse_identity("Nimbus,") == ("Nimbus", DEFAULT_CREATOR)
    with pytest.raises(CamelidError, match="the assistant's name is empty"):
        parse_identity(" ,the Orbit Lab")
