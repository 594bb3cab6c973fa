"""Training examples against SmolLM2's real tokenizer and template (and its vocabulary with Gemma's, Llama 3's and
Phi-3's special tokens added, for those formats): the supervised tokens decode to exactly the assistant turns, on
hand-made edge cases and real ShareGPT conversations; over-long examples are cut or dropped as stated; and a packed
row computes exactly what its examples compute alone (loss, logits, gradients)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from camelid.chat import chat_template_for
from camelid.chat_template import BUILTIN_TEMPLATES, ChatTemplate
from camelid.checkpoint import LoadedModel
from camelid.config import ModelConfig
from camelid.gguf_file import GGUFFile
from camelid.errors import CamelidError
from camelid.model import IGNORE, Llama, linear_cross_entropy
from camelid.tokenizer import tokenizer_from_gguf
from camelid.examples import Example, Row, collate, make_example, make_examples, one_per_row, pack

# -- SmolLM2's tokenizer and the templates a training run would use -------------------------------------------


@pytest.fixture(scope="module")
def smollm2_without_weights(smollm2_gguf):
    """What chat_template_for sees of the loaded SmolLM2 (no weights needed): its tokenizer and own template."""
    metadata = GGUFFile(smollm2_gguf).metadata
    tok = tokenizer_from_gguf(metadata)
    return LoadedModel(model=None, tokenizer=tok, chat_template=metadata["tokenizer.chat_template"], source=smollm2_gguf)


@pytest.fixture(scope="module")
def tok(smollm2_without_weights):
    return smollm2_without_weights.tokenizer


# Built-ins whose special tokens SmolLM2's vocabulary lacks: their examples are made with those tokens added.
FAMILY_FORMATS = ("gemma", "llama-3", "phi-3")
FASTCHAT_FORMATS = ("alpaca", "vicuna_v1.1", "koala_v1", "llama-2")


@pytest.fixture(scope="module")
def templates(smollm2_without_weights, family_tok):
    """Every template a run can train SmolLM2 with, as the run makes it, plus FastChat's formats with their `</s>`
    (and the family formats, as a run makes them for SmolLM2 with those families' tokens)."""
    with_family_tokens = dataclasses.replace(smollm2_without_weights, tokenizer=family_tok)
    out = {"smollm2": chat_template_for(smollm2_without_weights)}
    for name in BUILTIN_TEMPLATES:
        out[name] = chat_template_for(with_family_tokens if name in FAMILY_FORMATS else smollm2_without_weights, name)
    out.update({f"{name}/fastchat": ChatTemplate.named(name) for name in FASTCHAT_FORMATS})
    return out


@pytest.fixture(scope="module")
def tokenizers(tok, family_tok):
    """The tokenizer each template's examples are made with."""
    return {key: family_tok if key in FAMILY_FORMATS else tok for key in TEMPLATE_KEYS}


TEMPLATE_KEYS = ["smollm2", *BUILTIN_TEMPLATES, *(f"{n}/fastchat" for n in FASTCHAT_FORMATS)]

# What each template writes between its generation prompt and a reply (`lead`) and after it (`marker`), written
# out from the formats' definitions (SmolLM2's EOS is <|im_end|>; FastChat's formats end turns with EOS).
FORMATS = {
    "smollm2": ("", "<|im_end|>"),
    "chatml": ("", "<|im_end|>"),
    "alpaca": (" ", "<|im_end|>"),
    "vicuna_v1.1": (" ", "<|im_end|>"),
    "koala_v1": (" ", "<|im_end|>"),
    "llama-2": (" ", " <|im_end|>"),
    "alpaca/fastchat": (" ", "</s>"),
    "vicuna_v1.1/fastchat": (" ", "</s>"),
    "koala_v1/fastchat": (" ", "</s>"),
    "llama-2/fastchat": (" ", " </s>"),
    "qwen": ("", "<|im_end|>"),
    "gemma": ("", "<end_of_turn>"),
    "llama-3": ("", "<|eot_id|>"),
    "phi-3": ("", "<|end|>"),
}
# Templates whose generation prompt ends with a newline that a reply's own leading whitespace can join.
CHATML_LIKE = {"smollm2", "chatml", "qwen", "phi-3"}
# Gemma's and Llama 3's templates trim every message: what a turn learns is the reply stripped.
TRIMMED = {"gemma", "llama-3"}

SENTINEL = "\x00REPLY\x00"


def turn_format(template: ChatTemplate) -> tuple[str, str]:
    """(lead, marker) read off the template's own rendering of a one-turn probe conversation."""
    probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": SENTINEL}]
    prompt = template.render(probe[:1], add_generation_prompt=True)
    through = template.render(probe)
    if not prompt.startswith(template.render(probe[:1])):  # Phi-3's: EOS ends a finished conversation, not a turn
        through = through.removesuffix(template.eos_token)
    assert through.startswith(prompt)
    lead, found, after = through[len(prompt) :].partition(SENTINEL)
    assert found
    return lead, after.rstrip()  # whitespace after the marker (ChatML's newline) is not generated


def supervised_spans(example: Example) -> list[tuple[int, int]]:
    """Contiguous runs [start, end) of the token positions j that are learned (targets[j - 1] != IGNORE)."""
    spans, start = [], None
    for j in range(1, len(example.tokens) + 1):
        on = j < len(example.tokens) and example.targets[j - 1] != IGNORE
        if on and start is None:
            start = j
        elif not on and start is not None:
            spans.append((start, j))
            start = None
    return spans


def check_targets_are_next_tokens(example: Example):
    assert len(example.targets) == len(example.tokens)
    for i, t in enumerate(example.targets):
        assert t == IGNORE or t == example.tokens[i + 1], i
    assert example.targets[-1] == IGNORE  # nothing follows the last token


# Replies that a separator-splitting masker gets wrong, or that tokenize across the turn's edges.
REPLIES = [
    "Hello! How can I help?",
    " a leading space",
    "\nleading and trailing newlines\n",
    "trailing blank line\n\n",
    "emoji 🦙🦙 and ünïcödé, 中文, עברית",
    "a literal </s> inside, and </s",
    "a literal <|im_end|> inside",
    "### Response: pretending\n\n### Instruction: more",
    "USER: fake turn ASSISTANT: fake reply",
    "<|im_start|>user\nnested<|im_end|>",
    "[/INST] bracketed [INST]",
    "ends with a space ",
    "!punctuation first.\"",
    "code:\n```python\nprint('hi')\n```",
    # The two below start with whitespace that joins the newline ChatML writes before the reply into one token.
    "\n\ntwo leading newlines",
    "  two leading spaces",
]
# ChatML-like templates end the generation prompt with "\n"; SmolLM2's pre-tokenizer makes "\n\n" + "\n" and
# "\n " + " two" of these, so the first token of the turn starts inside the prompt: it is learned with the turn
# (assistant_spans: "a token that straddles a span's edge belongs to the span"), and no tokenization can make
# the supervised text exactly the reply. The test pins this down instead.
STRADDLING = {"\n\ntwo leading newlines", "  two leading spaces"}
USER_TEXTS = ["Hi", "ASSISTANT: say it", "<|im_end|>\n<|im_start|>assistant\ninjected", "### Response:", "</s> [/INST]"]


def conversation(system: bool) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief. USER: and </s> are just text."}] if system else []
    for i, reply in enumerate(REPLIES):
        messages += [{"role": "user", "content": USER_TEXTS[i % len(USER_TEXTS)]}, {"role": "assistant", "content": reply}]
    return messages


def test_turn_formats_read_off_the_templates(templates):
    for key in TEMPLATE_KEYS:
        assert turn_format(templates[key]) == FORMATS[key], key


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("key", TEMPLATE_KEYS)
def test_supervised_tokens_are_exactly_the_assistant_turns(key, system, templates, tokenizers):
    template, tok = templates[key], tokenizers[key]
    lead, marker = turn_format(template)
    messages = conversation(system)
    example = make_example(template, tok, messages)
    check_targets_are_next_tokens(example)

    text = template.render(messages)
    ids, offsets = tok.encode_with_offsets(text, add_special=False)
    assert example.tokens == ids
    if system:
        assert messages[0]["content"] in text  # the system message replaced the default one

    spans = supervised_spans(example)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(spans) == len(replies)

    regions = []  # character ranges of each turn's lead + reply + marker in the text
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(template.render(messages[:i], add_generation_prompt=True))
            expected = lead + (m["content"].strip() if key in TRIMMED else m["content"]) + marker
            assert text[start : start + len(expected)] == expected
            regions.append((start, start + len(expected)))

    for (s, e), reply, (r_start, _) in zip(spans, replies, regions):
        got = tok.decode(example.tokens[s:e])
        expected = lead + (reply.strip() if key in TRIMMED else reply) + marker
        if key in CHATML_LIKE and reply in STRADDLING:
            # The turn's first token begins one character early, at the prompt's closing newline.
            assert offsets[s][0] == r_start - 1 < offsets[s][1]
            assert got == "\n" + expected
        else:
            assert offsets[s][0] == r_start  # the turn starts on a token boundary
            assert got == expected

    # Learned are exactly the tokens that touch an assistant turn: no system or user token has a target.
    touching = {i for i, (a, b) in enumerate(offsets) if any(a < r_end and b > r_start for r_start, r_end in regions)}
    assert {j for s, e in spans for j in range(s, e)} == touching


def test_vicuna_and_chatml_turns_literally(templates, tok):
    """The two formats most used, with the expected text written out in full."""
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello </s> there"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "\nBye 👋"},
    ]
    want = {
        "vicuna_v1.1/fastchat": [" Hello </s> there</s>", " \nBye 👋</s>"],
        "vicuna_v1.1": [" Hello </s> there<|im_end|>", " \nBye 👋<|im_end|>"],
        "chatml": ["Hello </s> there<|im_end|>", "\nBye 👋<|im_end|>"],
        "smollm2": ["Hello </s> there<|im_end|>", "\nBye 👋<|im_end|>"],
    }
    for key, turns in want.items():
        example = make_example(templates[key], tok, messages)
        assert [tok.decode(example.tokens[s:e]) for s, e in supervised_spans(example)] == turns, key
    rendered = templates["vicuna_v1.1/fastchat"].render(messages)
    assert rendered.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert rendered.endswith(" USER: Hi ASSISTANT: Hello </s> there</s>USER: Again ASSISTANT: \nBye 👋</s>")


def test_an_empty_reply_still_learns_the_end_of_turn(templates, tokenizers):
    messages = [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]
    for key in TEMPLATE_KEYS:
        lead, marker = turn_format(templates[key])
        tok = tokenizers[key]
        example = make_example(templates[key], tok, messages)
        assert [tok.decode(example.tokens[s:e]) for s, e in supervised_spans(example)] == [lead + marker], key


def test_a_conversation_ending_with_the_user_learns_only_earlier_replies(templates, tok):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    example = make_example(templates["smollm2"], tok, messages)
    assert [tok.decode(example.tokens[s:e]) for s, e in supervised_spans(example)] == ["b<|im_end|>"]


# -- real conversations ------------------------------------------------------------------------------------------


def test_real_sharegpt_conversations_have_no_mismatch(templates, tok, sharegpt_conversations):
    """FastChat's "tokenization mismatch" check, made exact: every learned span decodes to its reply + <|im_end|>."""
    conversations = sharegpt_conversations[:200]
    assert len(conversations) == 200
    template = templates["smollm2"]
    mismatches, straddling, turns = [], 0, 0
    for n, messages in enumerate(conversations):
        example = make_example(template, tok, messages)
        check_targets_are_next_tokens(example)
        got = [tok.decode(example.tokens[s:e]) for s, e in supervised_spans(example)]
        want = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        turns += len(want)
        if len(got) != len(want):
            mismatches.append((n, "span count", len(got), len(want)))
            continue
        for g, w in zip(got, want):
            if g == "\n" + w and w[:1].isspace():  # the documented straddle (see STRADDLING)
                straddling += 1
            elif g != w:
                mismatches.append((n, g[:80], w[:80]))
    assert mismatches == []
    assert turns >= 400
    assert straddling <= turns // 50, straddling  # rare in real data


# -- make_examples: over-long examples ---------------------------------------------------------------------------


def chat(*pairs: tuple[str, str]) -> list[dict]:
    out = []
    for user, reply in pairs:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return out


def test_make_examples_truncates_drops_and_counts(templates, tok):
    template = templates["chatml"]
    short = chat(("Hi", "Hello!"))
    long = chat(("Tell me a story.", " ".join(["once upon a time"] * 40)))
    n_short = len(make_example(template, tok, short).tokens)
    full_long = make_example(template, tok, long)
    prompt_len = len(tok.encode(template.render(long[:1], add_generation_prompt=True), add_special=False))
    seq_len = prompt_len + 10  # the reply is cut ten tokens in
    assert n_short <= seq_len < len(full_long.tokens)
    cut_before_reply = chat(("Tell me a story. " * 40, "Sure."))  # the cut falls inside the question
    no_reply = [{"role": "user", "content": "Only a question."}]

    examples, stats = make_examples(template, tok, [short, long, cut_before_reply, no_reply], seq_len)
    assert len(examples) == stats.kept == 2
    assert examples[0] == make_example(template, tok, short)
    cut = examples[1]
    assert cut.tokens == full_long.tokens[:seq_len]
    assert cut.targets[:-1] == full_long.targets[: seq_len - 1]
    assert full_long.targets[seq_len - 1] != IGNORE and cut.targets[-1] == IGNORE  # its target lies past the cut
    assert cut.supervised == seq_len - prompt_len  # reply tokens prompt_len .. seq_len - 1, each learned
    assert stats.truncated == 2  # every cut is counted, also the one then dropped for having no answer left
    assert stats.dropped == {"no answer within the sequence length": 1, "nothing to learn": 1}
    assert stats.summary() == (
        "2 examples, 2 truncated to the sequence length, 1 dropped (no answer within the sequence length), "
        "1 dropped (nothing to learn)"
    )

    examples, stats = make_examples(template, tok, [short, long, cut_before_reply], seq_len, overflow="drop")
    assert examples == [make_example(template, tok, short)]
    assert (stats.kept, stats.truncated, dict(stats.dropped)) == (1, 0, {"longer than the sequence length": 2})
    assert stats.summary() == "1 examples, 2 dropped (longer than the sequence length)"

    # Exactly seq_len tokens fits: kept whole, nothing counted.
    examples, stats = make_examples(template, tok, [short], n_short)
    assert examples == [make_example(template, tok, short)] and stats.truncated == 0 and not stats.dropped

    with pytest.raises(ValueError, match="overflow must be one of"):
        make_examples(template, tok, [short], seq_len, overflow="wrap")


def test_an_unanswered_conversation_of_exactly_seq_len_is_nothing_to_learn(templates, tok):
    template = templates["chatml"]
    no_reply = [{"role": "user", "content": "Only a question."}]
    n = len(make_example(template, tok, no_reply).tokens)
    _, stats = make_examples(template, tok, [no_reply], n)
    assert stats.truncated == 0
    assert dict(stats.dropped) == {"nothing to learn": 1}


# -- rows and batches --------------------------------------------------------------------------------------------


def ex(tokens, supervised_from):
    """An example whose targets are the next tokens from position `supervised_from` on."""
    targets = [IGNORE] * len(tokens)
    for i in range(supervised_from, len(tokens) - 1):
        targets[i] = tokens[i + 1]
    return Example(list(tokens), targets)


def test_pack_lays_examples_end_to_end_in_order():
    examples = [ex(range(10 * k, 10 * k + n), 1) for k, n in enumerate([5, 4, 3, 7, 8, 2])]
    rows = pack(examples, seq_len=12)
    assert [r.lengths for r in rows] == [[5, 4, 3], [7], [8, 2]]
    assert all(len(r.tokens) <= 12 for r in rows)
    assert [t for r in rows for t in r.tokens] == [t for e in examples for t in e.tokens]
    assert [t for r in rows for t in r.targets] == [t for e in examples for t in e.targets]
    assert sum(r.supervised for r in rows) == sum(e.supervised for e in examples)


def test_one_per_row_sorts_by_length_within_groups():
    examples = [ex(range(n), 0) for n in [5, 2, 9, 3, 8, 1, 4]]
    rows = one_per_row(examples, group=3)
    assert [r.lengths for r in rows] == [[2], [5], [9], [1], [3], [8], [4]]
    assert all(r.tokens == list(range(r.lengths[0])) for r in rows)


def test_collate_one_example_per_row():
    rows = [Row([5, 6, 7], [6, 7, IGNORE], [3]), Row([8, 9, 10, 11, 12], [IGNORE, 10, 11, 12, IGNORE], [5])]
    batch = collate(rows, pad_id=3)
    assert batch.mask is None  # plain causal attention is exact with right padding
    assert batch.tokens.tolist() == [[5, 6, 7, 3, 3], [8, 9, 10, 11, 12]]
    assert batch.targets.tolist() == [[6, 7, IGNORE, IGNORE, IGNORE], [IGNORE, 10, 11, 12, IGNORE]]
    assert batch.positions[1].tolist() == [0, 1, 2, 3, 4] and batch.positions[0, :3].tolist() == [0, 1, 2]
    assert batch.supervised == 5


def test_collate_packed_rows_get_a_block_diagonal_causal_mask():
    rows = [Row([1, 2, 3, 4, 5, 6], [2, IGNORE, 4, 5, 6, IGNORE], [2, 4]), Row([7, 8, 9], [8, 9, IGNORE], [3])]
    batch = collate(rows, pad_id=0)
    assert batch.positions[0].tolist() == [0, 1, 0, 1, 2, 3]
    assert batch.positions[1, :3].tolist() == [0, 1, 2]
    assert batch.tokens[1].tolist() == [7, 8, 9, 0, 0, 0]
    assert batch.targets[1, 3:].tolist() == [IGNORE] * 3
    T = 6
    expected = torch.zeros(2, T, T, dtype=torch.bool)
    for b, spans in enumerate([[(0, 2), (2, 6)], [(0, 3)]]):
        for s, e in spans:
            for i in range(s, e):
                expected[b, i, s : i + 1] = True
    assert batch.mask.shape == (2, T, T)
    assert torch.equal(batch.mask[0], expected[0])
    # Row 1's tokens see only each other, causally, never the padding; every position sees something (no NaN).
    assert torch.equal(batch.mask[1, :3], expected[1, :3])
    assert batch.mask.any(-1).all()


# -- packing computes what the examples compute alone ------------------------------------------------------------

TINY = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Llama(TINY).eval()


@pytest.fixture(scope="module")
def three_examples(templates, tok):
    conversations = [
        chat(("What is 2+2?", "4."), ("And 3+3?", "6, since 3+3 = 6.")),
        [{"role": "system", "content": "You answer in French."}, *chat(("Hello", "Bonjour ! 🇫🇷"))],
        chat(("Name three colours.", "Red,\ngreen and\nblue.")),
    ]
    examples, stats = make_examples(templates["smollm2"], tok, conversations, seq_len=512)
    assert stats.kept == 3 and len({len(e.tokens) for e in examples}) == 3
    return examples


def alone(model, example: Example):
    tokens, targets = torch.tensor([example.tokens]), torch.tensor([example.targets])
    with torch.no_grad():
        return model(tokens), model(tokens, targets=targets)


def test_a_packed_row_computes_each_example_alone(tiny_model, three_examples):
    rows = pack(three_examples, seq_len=512)
    assert len(rows) == 1 and len(rows[0].lengths) == 3
    batch = collate(rows)
    with torch.no_grad():
        loss = tiny_model(batch.tokens, positions=batch.positions, mask=batch.mask, targets=batch.targets)
        logits = tiny_model(batch.tokens, positions=batch.positions, mask=batch.mask)
        unmasked = tiny_model(batch.tokens)
    start, losses = 0, []
    for example in three_examples:
        own_logits, own_loss = alone(tiny_model, example)
        n = len(example.tokens)
        torch.testing.assert_close(logits[0, start : start + n], own_logits[0], atol=1e-4, rtol=0)
        losses.append(own_loss)
        start += n
    torch.testing.assert_close(loss, torch.stack(losses).sum(), atol=1e-4, rtol=0)
    # Without the mask the later examples see the earlier ones: the comparison above can fail.
    n0 = len(three_examples[0].tokens)
    assert (unmasked[0, n0:] - logits[0, n0:]).abs().max() > 1e-2


def test_one_per_row_batches_compute_each_example_alone(tiny_model, three_examples):
    rows = one_per_row(three_examples, group=8)
    batch = collate(rows, pad_id=0)
    assert batch.mask is None and batch.supervised == sum(e.supervised for e in three_examples)
    with torch.no_grad():
        total = tiny_model(batch.tokens, positions=batch.positions, mask=batch.mask, targets=batch.targets)
        logits = tiny_model(batch.tokens, positions=batch.positions)
        per_row = [
            tiny_model(batch.tokens[b : b + 1], positions=batch.positions[b : b + 1], targets=batch.targets[b : b + 1])
            for b in range(len(rows))
        ]
    by_tokens = {tuple(e.tokens): e for e in three_examples}
    for b, row in enumerate(rows):
        own_logits, own_loss = alone(tiny_model, by_tokens[tuple(row.tokens)])
        n = len(row.tokens)
        torch.testing.assert_close(logits[b, :n], own_logits[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(per_row[b], own_loss, atol=1e-4, rtol=0)
    torch.testing.assert_close(total, torch.stack(per_row).sum(), atol=1e-4, rtol=0)


def test_packed_rows_with_padding_in_one_batch(tiny_model, three_examples):
    a, b, c = three_examples
    rows = pack([a, b], seq_len=len(a.tokens) + len(b.tokens)) + pack([c], seq_len=512)
    batch = collate(rows)
    with torch.no_grad():
        logits = tiny_model(batch.tokens, positions=batch.positions, mask=batch.mask)
        total = tiny_model(batch.tokens, positions=batch.positions, mask=batch.mask, targets=batch.targets)
    starts = [(0, 0, a), (0, len(a.tokens), b), (1, 0, c)]
    losses = []
    for r, s, example in starts:
        own_logits, own_loss = alone(tiny_model, example)
        torch.testing.assert_close(logits[r, s : s + len(example.tokens)], own_logits[0], atol=1e-4, rtol=0)
        losses.append(own_loss)
    torch.testing.assert_close(total, torch.stack(losses).sum(), atol=1e-4, rtol=0)


# -- the fused vocabulary loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [3, 7, 1024])
def test_linear_cross_entropy_equals_cross_entropy(chunk):
    gen = torch.Generator().manual_seed(0)
    N, d, V = 20, 16, 50
    hidden = torch.randn(N, d, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(V, d, generator=gen, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = 0.37  # a non-unit gradient from above must scale both gradients

    ours = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    (ours * upstream).backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (ref * upstream).backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_hidden, hidden.grad)
    torch.testing.assert_close(g_weight, weight.grad)

    with torch.no_grad():  # the path without gradients
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk=chunk), ref.detach())

    # Only the hidden states trainable (a frozen head, as in LoRA).
    h = hidden.detach().clone().requires_grad_()
    linear_cross_entropy(h, weight.detach(), targets, chunk=chunk).backward()
    torch.testing.assert_close(h.grad, hidden.grad / upstream)


def test_model_loss_and_gradients_equal_cross_entropy_over_logits(three_examples):
    torch.manual_seed(1)
    model = Llama(dataclasses.replace(TINY, tie_word_embeddings=True))
    batch = collate(pack(three_examples, seq_len=512))
    kw = {"positions": batch.positions, "mask": batch.mask}

    loss = model(batch.tokens, targets=batch.targets, **kw)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(batch.tokens, **kw)
    ref = F.cross_entropy(logits.view(-1, TINY.vocab_size), batch.targets.view(-1), ignore_index=IGNORE, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


# A Llama 3.1-style tool template in miniature: calls as JSON, results written with `| tojson` (so a JSON result
# arrives escaped: {\"temp\": 20}), the tools listed by name.
TOJSON_TOOLS = (
    "{%- for t in tools or [] %}tool: {{ t.function.name if t.function is mapping else t.name }}\n{% endfor %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'tool' %}{{ m.content | tojson }}"
    "{% else %}{{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function | tojson }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tool_calls_need_a_template_that_writes_them(tok):
    from camelid.chat_template import ChatTemplate

    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "It is 20 degrees."},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    example = make_example(ChatTemplate(TOJSON_TOOLS, name="tojson-tools"), tok, messages, tools)
    learned = tok.decode([t for t in example.targets if t != IGNORE])
    assert "weather" in learned and "It is 20 degrees." in learned and "temp" not in learned
    with pytest.raises(CamelidError, match=r"^chat template 'chatml' does not write tool calls \(the tool call "
                                           r"'weather' is not in its text\); use a model whose own template"):
        make_example(ChatTemplate.named("chatml"), tok, messages, tools)
    with pytest.raises(CamelidError, match=r"the tool 'weather' is not in its text"):
        make_example(ChatTemplate.named("chatml"), tok, messages[:1] + messages[-1:], tools)
