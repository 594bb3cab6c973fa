"""Chat templates against real references: transformers' renderer, FastChat's formats, llama.cpp's chat formats,
SmolLM2's own template, and the Gemma 3 270M file that carries none."""

import ctypes
import functools
import json

import pytest

from camelid.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    assistant_spans,
    family_template,
    read_chat_template,
)
from camelid.errors import CamelidError

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
SHORT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]
SMOLLM2_SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}


def reference_render(source: str, messages, *, add_generation_prompt=False, **specials) -> str:
    """transformers' own rendering of `source` (its apply_chat_template on a tokenizer holding that template)."""
    tokenizer = _reference_tokenizer()
    tokenizer.chat_template = source
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **specials
    )


@functools.cache
def _reference_tokenizer():
    return reference_tokenizer()


def reference_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    # Rendering needs no vocabulary: a one-word tokenizer keeps this test fast.
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))


@pytest.fixture(scope="module")
def conversations(sharegpt_conversations):
    """Real multi-turn ShareGPT conversations (most of 4-6 messages), plain and with a system message."""
    multi = [c for c in sharegpt_conversations if len(c) >= 4][:12]
    assert len(multi) >= 8
    return multi + [[SYSTEM] + c for c in multi[:6]]


# -- the model's own template ------------------------------------------------------------------------------


def test_smollm2_template_renders_like_transformers(smollm2_gguf, conversations):
    source = read_chat_template(smollm2_gguf)
    template = ChatTemplate(source, name="SmolLM2", **SMOLLM2_SPECIALS)
    for messages in conversations:
        for prompt in (False, True):
            expected = reference_render(source, messages, add_generation_prompt=prompt, **SMOLLM2_SPECIALS)
            assert template.render(messages, add_generation_prompt=prompt) == expected
    # The default system prompt appears only when the conversation brings none.
    assert "named SmolLM" in template.render(conversations[0])
    assert "named SmolLM" not in template.render([SYSTEM] + conversations[0])


@pytest.mark.slow
def test_smollm2_template_matches_transformers_loading_the_gguf(smollm2_gguf, conversations):
    """transformers reads the template and special tokens from the GGUF itself; camelid must render the same."""
    from camelid.tokenizer import load_tokenizer

    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    ours = load_tokenizer(smollm2_gguf)
    template = ChatTemplate(read_chat_template(smollm2_gguf), bos_token=ours.bos_token, eos_token=ours.eos_token)
    for messages in conversations:
        for prompt in (False, True):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert template.render(messages, add_generation_prompt=prompt) == expected


TRANSFORMERS_FEATURES = """\
{%- set ns = namespace(count=0) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' %}{% continue %}{% endif -%}
    {%- set ns.count = ns.count + 1 -%}
    {%- generation -%}[{{ message['role'] }}] {{ message['content'] }}{%- endgeneration %}
{% if ns.count > 2 %}{% break %}{% endif -%}
{%- endfor -%}
{{ messages[0] | tojson }} {{ dict(a=1, b='<&>') | tojson(indent=2) }} {{ strftime_now('%Y') }}
{%- if tools is not none %}{{ raise_exception('no tools') }}{% endif %}"""


def test_transformers_template_features_render_the_same():
    messages = [SYSTEM, {"role": "user", "content": "Ünïcode <b>&amp;</b> \"quoted\""}] + SHORT
    assert ChatTemplate(TRANSFORMERS_FEATURES).render(messages) == reference_render(TRANSFORMERS_FEATURES, messages)


def test_none_fields_count_as_absent_like_transformers():
    source = "{% for m in messages %}{{ m.role }}{% if m.tool_calls is defined %}+tools{% endif %};{% endfor %}"
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "tool_calls": None}]
    assert ChatTemplate(source).render(messages) == reference_render(source, messages) == "user;assistant;"


def test_reasoning_fields_are_aliased_like_transformers():
    source = "{% for m in messages %}{{ [m.role, m.reasoning_content, m.thinking, m.content]|join('/') }};{% endfor %}"
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning": "add"},
                {"role": "assistant", "content": "5", "thinking": "off by one"}]
    assert ChatTemplate(source).render(messages) == reference_render(source, messages)
    assert "assistant/add/add/4;" in ChatTemplate(source).render(messages)


# -- built-ins ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
@pytest.mark.parametrize("specials", [{}, {"bos_token": "<s>", "eos_token": "</s>"}, SMOLLM2_SPECIALS])
def test_builtin_renders_like_transformers(name, specials, conversations):
    template = ChatTemplate.named(name, **specials)
    for messages in conversations:
        for prompt in (False, True):
            expected = reference_render(template.source, messages, add_generation_prompt=prompt, **specials)
            assert template.render(messages, add_generation_prompt=prompt) == expected


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

# The classic formats spelled out by hand: SHORT + a third question, with the generation prompt.
EXPECTED = {
    "alpaca": ALPACA_SYSTEM + "\n\n### Instruction: Hi\n\n### Response: Hello!</s>"
    "### Instruction: Name a colour.\n\n### Response: Blue.</s>### Instruction: Why?\n\n### Response:",
    "vicuna_v1.1": VICUNA_SYSTEM + " USER: Hi ASSISTANT: Hello!</s>USER: Name a colour. ASSISTANT: Blue.</s>"
    "USER: Why? ASSISTANT:",
    "koala_v1": "BEGINNING OF CONVERSATION: USER: Hi GPT: Hello!</s>USER: Name a colour. GPT: Blue.</s>"
    "USER: Why? GPT:",
    "llama-2": "[INST] Hi [/INST] Hello! </s>[INST] Name a colour. [/INST] Blue. </s>[INST] Why? [/INST]",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
    "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
}
# With a system message, LLaMA's BOS and EOS given, and no generation prompt.
EXPECTED_WITH_SYSTEM = {
    "alpaca": "<s>Be brief.\n\n### Instruction: Hi\n\n### Response: Hello!</s>"
    "### Instruction: Name a colour.\n\n### Response: Blue.</s>",
    "vicuna_v1.1": "<s>Be brief. USER: Hi ASSISTANT: Hello!</s>USER: Name a colour. ASSISTANT: Blue.</s>",
    "koala_v1": "<s>Be brief. USER: Hi GPT: Hello!</s>USER: Name a colour. GPT: Blue.</s>",
    "llama-2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
    "<s>[INST] Name a colour. [/INST] Blue. </s>",
    "chatml": "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
    "<|im_start|>assistant\nBlue.<|im_end|>\n",
}


@pytest.mark.parametrize("name", EXPECTED)
def test_builtin_spells_the_classic_format(name):
    question = [{"role": "user", "content": "Why?"}]
    assert ChatTemplate.named(name).render(SHORT + question, add_generation_prompt=True) == EXPECTED[name]
    with_system = ChatTemplate.named(name, bos_token="<s>", eos_token="</s>")
    assert with_system.render([{"role": "system", "content": "Be brief."}] + SHORT) == EXPECTED_WITH_SYSTEM[name]


def test_builtin_ends_assistant_turns_with_the_models_eos():
    text = ChatTemplate.named("vicuna_v1.1", eos_token="<|im_end|>").render(SHORT)
    assert text.endswith("ASSISTANT: Hello!<|im_end|>USER: Name a colour. ASSISTANT: Blue.<|im_end|>")


# FastChat's own definitions, where fschat is installed; chatml is FastChat's qwen-7b-chat ChatML format, and so is
# qwen with Qwen2.5's default system prompt. FastChat 0.2.36 has no gemma, llama-3 or phi-3 (see llama.cpp below).
FASTCHAT_NAMES = {"alpaca": "alpaca", "vicuna_v1.1": "vicuna_v1.1", "koala_v1": "koala_v1",
                  "llama-2": "llama-2", "chatml": "qwen-7b-chat", "qwen": "qwen-7b-chat"}
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.mark.parametrize("name", FASTCHAT_NAMES)
def test_builtin_equals_fastchat(name, conversations):
    conversation_module = pytest.importorskip("fastchat.conversation")
    # llama-2's FastChat separator carries a literal <s>, and LLaMA's tokenizer adds the first one.
    template = ChatTemplate.named(name, bos_token="<s>" if name == "llama-2" else None)
    for messages in conversations:
        if not all(m["content"] for m in messages):  # FastChat reads an empty message as "generate here"
            continue
        for prompt in (False, True):
            if prompt and messages[-1]["role"] == "assistant":
                messages = messages[:-1]  # a generation prompt follows the user's turn
            conv = conversation_module.get_conv_template(FASTCHAT_NAMES[name])
            if name == "qwen":
                conv.set_system_message(QWEN_SYSTEM)
            turns = messages
            if messages[0]["role"] == "system":
                conv.set_system_message(messages[0]["content"])
                turns = messages[1:]
            for i, message in enumerate(turns):
                conv.append_message(conv.roles[i % 2], message["content"])
            if prompt:
                conv.append_message(conv.roles[1], None)
            expected = ("<s>" if name == "llama-2" else "") + conv.get_prompt()
            if name == "llama-2" and not prompt:
                # FastChat leaves its separator's <s> dangling after a final reply; it starts the next turn here.
                expected = expected.removesuffix("<s>")
            assert template.render(messages, add_generation_prompt=prompt) == expected


def test_unknown_template_name_lists_the_choices():
    choices = "alpaca, vicuna_v1.1, koala_v1, chatml, llama-2, gemma, qwen, llama-3, phi-3"
    with pytest.raises(CamelidError, match=f"unknown chat template 'vicuna'; built-in templates: {choices}"):
        ChatTemplate.named("vicuna")
    assert ChatTemplate.named("ChatML").name == "chatml"


def test_builtin_refuses_roles_out_of_order():
    with pytest.raises(CamelidError, match="'vicuna_v1.1' refused the conversation: .*roles must alternate"):
        ChatTemplate.named("vicuna_v1.1").render([{"role": "assistant", "content": "x"}])


def test_template_errors_name_the_template():
    with pytest.raises(CamelidError, match="chat template 'mine' does not compile: .*line 1"):
        ChatTemplate("{% for m in messages %}{{ m.content }}", name="mine")
    with pytest.raises(CamelidError, match="chat template 'mine' failed to render: TypeError"):
        ChatTemplate("{{ messages[0].content + 1 }}", name="mine").render(SHORT)
    with pytest.raises(CamelidError, match=r"chat template \(unnamed\) refused the conversation: no system prompts"):
        ChatTemplate("{{ raise_exception('no system prompts') }}").render([SYSTEM])
    with pytest.raises(CamelidError, match="JSON data"):
        ChatTemplate.named("chatml").render([{"role": "user", "content": object()}])


def test_each_template_compiles_once():
    source = "{{ messages | length }} " + "x" * 37  # a source no other test uses
    first, second = ChatTemplate(source), ChatTemplate(source)
    assert first._template is second._template


# -- the family built-ins: gemma, qwen, llama-3, phi-3 ---------------------------------------------------------

# Each family's end-of-turn token: it ends every assistant turn, and generation stops at it.
END_OF_TURN = {"gemma": "<end_of_turn>", "qwen": "<|im_end|>", "llama-3": "<|eot_id|>", "phi-3": "<|end|>"}
# The special tokens each family's tokenizer gives (Qwen's GGUF files name <|endoftext|> as BOS, Phi-3's <s>;
# neither family's template writes one).
FAMILY_SPECIALS = {
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "qwen": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
    "llama-3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "phi-3": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
}

PADDED = [{"role": "user", "content": "  Hi \n"}, {"role": "assistant", "content": "\nHello! "}]
# (messages, add_generation_prompt): a system message and a question; SHORT finished; whitespace around messages.
FAMILY_CASES = [([{"role": "system", "content": "Be brief."}, *SHORT[:3]], True), (SHORT, False), (PADDED, False)]
# The official formats written out by hand, one string per case, with FAMILY_SPECIALS given.
FAMILY_EXPECTED = {
    "gemma": [
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n",
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\nBlue.<end_of_turn>\n",
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    ],
    "qwen": [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n",
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\nBlue.<|im_end|>\n",
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n  Hi \n<|im_end|>\n"
        "<|im_start|>assistant\n\nHello! <|im_end|>\n",
    ],
    "llama-3": [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
    ],
    "phi-3": [
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nName a colour.<|end|>\n<|assistant|>\n",
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nName a colour.<|end|>\n"
        "<|assistant|>\nBlue.<|end|>\n<|endoftext|>",
        "<|user|>\n  Hi \n<|end|>\n<|assistant|>\n\nHello! <|end|>\n<|endoftext|>",
    ],
}


@pytest.mark.parametrize("name", END_OF_TURN)
def test_family_builtin_spells_the_official_format(name):
    """Written out from each family's official template; transformers renders our source the same."""
    specials = FAMILY_SPECIALS[name]
    template = ChatTemplate.named(name, **specials)
    for (messages, prompt), expected in zip(FAMILY_CASES, FAMILY_EXPECTED[name], strict=True):
        assert template.render(messages, add_generation_prompt=prompt) == expected
        assert reference_render(template.source, messages, add_generation_prompt=prompt, **specials) == expected


def test_gemma_refuses_roles_out_of_order():
    for messages in ([SYSTEM, SHORT[1]], SHORT[:1] * 2, [SYSTEM, SHORT[0], SYSTEM]):
        with pytest.raises(CamelidError, match="'gemma' refused the conversation: .*roles must alternate"):
            ChatTemplate.named("gemma").render(messages)


def llama_cpp_render(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """llama.cpp's own chat format for `template`: a format's name, or a Jinja source it recognises the format of
    (as it does for a GGUF file's template when not running it as Jinja)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages]
    )
    size = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), add_generation_prompt, None, 0)
    assert size >= 0, f"llama.cpp knows no chat format for {template[:60]!r}"
    out = ctypes.create_string_buffer(size + 1)
    llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), add_generation_prompt, out, size + 1)
    return out.raw[:size].decode("utf-8")


LLAMA_CPP_FORMATS = {"gemma": "gemma", "qwen": "chatml", "llama-3": "llama3", "phi-3": "phi3"}


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", LLAMA_CPP_FORMATS)
def test_family_builtin_equals_llama_cpp(name, conversations):
    """llama.cpp's hand-written format of the family, and the one it picks for our source, write the same text.

    What llama.cpp leaves out is left out here too: BOS (its tokenizer adds it) and the EOS that ends a finished
    Phi-3 conversation (both written only when given), and a default system prompt (its chatml has none, so
    Qwen's is given as a message). It also trims Gemma's system text, which Gemma 3's template does not; these
    system messages have no whitespace to trim.
    """
    template = ChatTemplate.named(name)
    for messages in conversations:
        if name == "qwen" and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": QWEN_SYSTEM}, *messages]
        for prompt in (False, True):
            ours = template.render(messages, add_generation_prompt=prompt)
            assert llama_cpp_render(LLAMA_CPP_FORMATS[name], messages, prompt) == ours
            assert llama_cpp_render(template.source, messages, prompt) == ours


@pytest.mark.parametrize("name", END_OF_TURN)
def test_family_turns_end_with_a_token_generation_stops_at(name, family_tok, conversations):
    """Each learned turn is the reply and the end-of-turn token, which is one token and among the stop ids that
    generation stops at; Phi-3's closing EOS is learned by no turn."""
    tok = family_tok
    end = tok.encode(END_OF_TURN[name], add_special=False)
    assert len(end) == 1 and end[0] in tok.stop_ids
    template = ChatTemplate.named(name, **FAMILY_SPECIALS[name])
    for messages in [*conversations[:6], *conversations[-3:], PADDED]:
        ids = tok.encode(template.render(messages), add_special=False)
        spans = check_spans(template, messages, tok, lambda reply: TURN_TEXT[name](reply, None))
        assert [ids[end_ - 1] for _, end_ in spans] == end * len(spans)


def test_family_template_names_the_builtin_by_architecture(family_tok, smollm2_tokenizer):
    family, smollm2 = family_tok, smollm2_tokenizer
    assert family_template("gemma3", family) == family_template("gemma3_text", family) == "gemma"
    assert family_template("qwen2", family) == family_template("qwen2", smollm2) == "qwen"
    assert family_template("phi3", family) == "phi-3"
    assert family_template("llama", family) == "llama-3"
    # A llama-architecture file without Llama 3's vocabulary (SmolLM2, Llama 2, Mistral): no guess.
    assert family_template("llama", smollm2) is None
    # A family whose format this vocabulary cannot write, and families without a built-in.
    assert family_template("gemma3_text", smollm2) is None
    assert family_template("qwen3", family) is None and family_template("smollm3", family) is None


@pytest.mark.slow
def test_gemma3_270m_file_chats_in_the_gemma_builtin(gemma3_gguf):
    """The real Gemma 3 270M base GGUF carries no template: family_template names gemma for it, whose turn markers
    are the file's own control tokens and whose end of turn is a stop id."""
    from camelid.gguf_file import GGUFFile
    from camelid.tokenizer import tokenizer_from_gguf

    metadata = GGUFFile(gemma3_gguf).metadata
    assert read_chat_template(gemma3_gguf) is None
    tok = tokenizer_from_gguf(metadata)
    name = family_template(metadata["general.architecture"], tok)
    assert name == "gemma"
    template = ChatTemplate.named(name, bos_token=tok.bos_token if tok.add_bos else None, eos_token=tok.eos_token)
    messages = [SYSTEM, *SHORT]
    ids = tok.encode(template.render(messages), add_special=False)
    pieces = [tok.backend.id_to_token(i) for i in ids]
    assert pieces[0] == "<bos>" and pieces.count("<start_of_turn>") == pieces.count("<end_of_turn>") == 4
    spans = check_spans(template, messages, tok, lambda reply: reply + "<end_of_turn>")
    assert all(ids[end - 1] in tok.stop_ids for _, end in spans)


# -- the sandbox -------------------------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}{{ ''|attr('__class__') }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}{{ lipsum.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os }}",
    "{{ raise_exception.__globals__ }}{{ strftime_now.__globals__['__builtins__'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ dict.mro() }}{{ dict.__class__.__subclasses__() }}",
    "{{ messages.__class__ }}{{ messages|map(attribute='__class__')|join }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{{ '{0.__class__}'.format_map({'0': messages}) }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}{{ ns.__class__ }}",
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
    "{% set _ = messages.pop() %}",
    "{{ messages[0].update({'content': 'changed'}) }}{{ messages[0].clear() }}",
    "{{ 'x' * 100000000 }}",
    "{% set n = 100000000 %}{{ 7 ** n }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_blocks_escapes(source):
    messages = [dict(m) for m in SHORT]
    try:
        out = ChatTemplate(source).render(messages)
    except CamelidError:
        out = ""
    # Nothing of Python's internals comes out: at most undefined values, which render as nothing.
    assert out.replace("Undefined", "") == ""
    assert messages == SHORT  # the caller's conversation is untouched


def test_sandbox_refusal_is_one_clear_line():
    with pytest.raises(CamelidError, match="sandbox forbids") as info:
        ChatTemplate("{{ messages.append(1) }}").render(SHORT)
    assert "\n" not in str(info.value)


# -- assistant spans ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    from camelid.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


def check_spans(template, messages, tokenizer, turn_text):
    """Each span decodes to exactly `turn_text(content)`, and no token outside the spans touches assistant text."""
    text = template.render(messages)
    ids, offsets = tokenizer.encode_with_offsets(text, add_special=False)
    assert ids == tokenizer.encode(text, add_special=False)
    spans = assistant_spans(template, messages, tokenizer)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(spans) == len(replies)
    for (start, end), reply in zip(spans, replies):
        assert tokenizer.decode(ids[start:end]) == turn_text(reply)

    # Where the replies lie in the text, found from the known format (the test may split on separators).
    reply_chars, pos = [], 0
    for reply in replies:
        pos = text.index(turn_text(reply), pos)
        reply_chars.append((pos, pos + len(turn_text(reply))))
        pos += len(turn_text(reply))
    inside = {i for start, end in spans for i in range(start, end)}
    for i, (start, end) in enumerate(offsets):
        if i not in inside:
            assert not any(start < r_end and end > r_start for r_start, r_end in reply_chars), (i, text[start:end])
    return spans


def test_assistant_spans_smollm2(smollm2_gguf, smollm2_tokenizer, conversations):
    tok = smollm2_tokenizer
    template = ChatTemplate(read_chat_template(smollm2_gguf), bos_token=tok.bos_token, eos_token=tok.eos_token)
    for messages in conversations:
        spans = check_spans(template, messages, tok, lambda reply: reply + "<|im_end|>")
        assert len(spans) >= 2 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


# What each built-in makes the model generate after its generation prompt.
TURN_TEXT = {
    "alpaca": lambda reply, eos: " " + reply + eos,
    "vicuna_v1.1": lambda reply, eos: " " + reply + eos,
    "koala_v1": lambda reply, eos: " " + reply + eos,
    "llama-2": lambda reply, eos: " " + reply + " " + eos,
    "chatml": lambda reply, eos: reply + "<|im_end|>",
    # Gemma's and Llama 3's templates trim each message; Phi-3's EOS after the last <|end|> closes the conversation.
    "gemma": lambda reply, eos: reply.strip() + "<end_of_turn>",
    "qwen": lambda reply, eos: reply + "<|im_end|>",
    "llama-3": lambda reply, eos: reply.strip() + "<|eot_id|>",
    "phi-3": lambda reply, eos: reply + "<|end|>",
}


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
@pytest.mark.parametrize("eos", ["</s>", "<|im_end|>"])
def test_assistant_spans_builtins(name, eos, smollm2_tokenizer, family_tok, conversations):
    # The family formats with their special tokens whole, as in those families' vocabularies.
    tokenizer = family_tok if name in END_OF_TURN else smollm2_tokenizer
    template = ChatTemplate.named(name, eos_token=eos)
    for messages in conversations[:8] + conversations[-3:]:
        check_spans(template, messages, tokenizer, lambda reply: TURN_TEXT[name](reply, eos))


def test_assistant_spans_short_conversations(smollm2_tokenizer):
    template = ChatTemplate.named("chatml")
    check_spans(template, SHORT, smollm2_tokenizer, lambda reply: reply + "<|im_end|>")
    # A conversation that ends with the user's turn has spans only for the replies before it.
    ids = smollm2_tokenizer.encode(template.render(SHORT[:3]), add_special=False)
    spans = assistant_spans(template, SHORT[:3], smollm2_tokenizer)
    assert [smollm2_tokenizer.decode(ids[s:e]) for s, e in spans] == ["Hello!<|im_end|>"]


def test_assistant_spans_refuse_a_template_that_rewrites_earlier_turns(smollm2_tokenizer):
    # Marks the last message, as templates that drop earlier reasoning do: a prefix renders differently.
    source = "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %} (last){% endif %}\n{% endfor %}"
    with pytest.raises(CamelidError, match="'marks-last' does not render the conversation before message 1"):
        assistant_spans(ChatTemplate(source, name="marks-last"), SHORT, smollm2_tokenizer)


# -- reading a model's template ----------------------------------------------------------------------------


def test_read_chat_template_from_gguf(smollm2_gguf):
    source = read_chat_template(smollm2_gguf)
    assert source.startswith("{% for message in messages %}") and "<|im_start|>" in source


def test_read_chat_template_from_gguf_without_one(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "bare")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_chat_template(path) is None


def test_read_chat_template_from_directory_saved_by_transformers(tmp_path):
    tokenizer = reference_tokenizer()
    tokenizer.chat_template = BUILTIN_TEMPLATES["vicuna_v1.1"]
    tokenizer.save_pretrained(tmp_path)
    assert read_chat_template(tmp_path) == BUILTIN_TEMPLATES["vicuna_v1.1"]


def test_read_chat_template_from_tokenizer_config(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{{ messages[0].content }}", "eos_token": "</s>"}))
    assert read_chat_template(tmp_path) == "{{ messages[0].content }}"

    config.write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT"},
    ]}))
    assert read_chat_template(tmp_path) == "DEFAULT"

    (tmp_path / "chat_template.jinja").write_text("JINJA")  # the separate file wins, as in transformers
    assert read_chat_template(tmp_path) == "JINJA"


def test_read_chat_template_absent_or_broken(tmp_path):
    assert read_chat_template(tmp_path) is None
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"eos_token": "</s>"}))
    assert read_chat_template(tmp_path) is None

    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "TOOLS"}]}))
    with pytest.raises(CamelidError, match="tool_use but none named 'default'"):
        read_chat_template(tmp_path)
    config.write_text("{not json")
    with pytest.raises(CamelidError, match="not valid JSON"):
        read_chat_template(tmp_path)
    with pytest.raises(CamelidError, match="no such file or directory"):
        read_chat_template(tmp_path / "missing")
