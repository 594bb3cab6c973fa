"""Tool calling: calls read out of answers (whole and streamed in pieces), tools put into prompts (a template's own,
or the fallback), and through the live server with the official `openai` client and `langchain-openai`: required and
named calls constrained to valid arguments, streamed as OpenAI streams them, results fed back."""

import json
import random

import pytest
from helpers import live_server

from camelid.chat_template import ChatTemplate
from camelid.serve.protocol import ChatRequest
from camelid.errors import CamelidError
from camelid.serve.tools import (MAX_CALLS, CallStream, call_grammar, read_calls, tool_use,
                                 with_tools)

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                                       "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]
# A template written for these tests in the hermes format (Qwen2.5's way of listing tools and writing calls)
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
Tools:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'tool' %}<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% elif m.tool_calls %}<|im_start|>assistant
{%- for c in m.tool_calls %}
<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def use_of(template=None, **body):
    return tool_use(ChatRequest(model="m", messages=ASK, tools=[WEATHER, CLOCK], **body), template)


def calls_of(answer: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in answer]


# -- reading calls -------------------------------------------------------------------------------------------------

PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
ROME = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\", \\"unit\\": \\"celsius\\"}"}\n</tool_call>'
ANSWERS = {  # answer -> (content, calls)
    PARIS: (None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    f"Let me look.\n{PARIS}\n{ROME}\n": ("Let me look.", [("get_weather", {"city": "Paris", "unit": "celsius"}),
                                                         ("get_weather", {"city": "Rome", "unit": "celsius"})]),
    f"{PARIS}\nThen: {ROME}": ("Then:", [("get_weather", {"city": "Paris", "unit": "celsius"}),
                                        ("get_weather", {"city": "Rome", "unit": "celsius"})]),
    PARIS.removesuffix("\n</tool_call>"): (None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),  # cut at stop
    "It is sunny in Paris.": ("It is sunny in Paris.", []),
    "Use <tool_call> tags, like <tool_call": ("Use <tool_call> tags, like <tool_call", []),  # not JSON: content
    PARIS.replace("get_weather", "get_mood"): (PARIS.replace("get_weather", "get_mood"), []),  # no such tool
    f"{PARIS}\n<tool_call>\n{{broken</tool_call>": (f"{PARIS}\n<tool_call>\n{{broken</tool_call>", []),
}


@pytest.mark.parametrize("answer", ANSWERS, ids=range(len(ANSWERS)))
def test_calls_are_read_from_a_whole_answer(answer):
    content, calls = read_calls(answer, use_of())
    assert (content, calls_of(calls)) == ANSWERS[answer]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)


@pytest.mark.parametrize("answer", list(ANSWERS)[:6], ids=range(6))
def test_a_streamed_answer_in_any_pieces_gives_the_same_calls(answer):
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(answer)), min(len(answer) - 1, rng.randint(1, 12))))
        pieces = [answer[i:j] for i, j in zip([0, *cuts], [*cuts, len(answer)])]
        stream = CallStream(use_of())
        deltas = [d for piece in pieces for d in stream.feed(piece)]
        last, called = stream.end()
        deltas += last
        content = "".join(d.get("content", "") for d in deltas)
        calls: dict[int, dict] = {}
        for d in deltas:
            for part in d.get("tool_calls", []):
                call = calls.setdefault(part["index"], {"name": None, "arguments": ""})
                call["name"] = part.get("function", {}).get("name") or call["name"]
                call["arguments"] += part["function"].get("arguments", "")
        expected_content, expected_calls = ANSWERS[answer]
        assert (content or None) == expected_content
        assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == expected_calls
        assert called == bool(expected_calls)


# A template written for these tests in Llama 3.1's way: tools listed as JSON, calls as one bare JSON object
LLAMA_TEMPLATE = """\
{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{% if tools and loop.first %}Call a function as {"name": ..., "parameters": ...}:
{% for t in tools %}{{ t | tojson }}
{% endfor %}{% endif %}
{%- if m.tool_calls %}<|python_tag|>{{ m.tool_calls[0].function | tojson }}{% else %}{{ m.content }}{% endif %}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""
LLAMA_ANSWERS = {
    '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}':
        (None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}': (None, [("get_time", {"zone": "UTC"})]),
    "It is sunny {in} Paris.": ("It is sunny {in} Paris.", []),
    '{"city": "Paris"}': ('{"city": "Paris"}', []),  # JSON, but no call
}


@pytest.mark.parametrize("answer", LLAMA_ANSWERS, ids=range(len(LLAMA_ANSWERS)))
def test_llama_3_calls_are_read_whole_and_streamed(answer):
    use = use_of(ChatTemplate(LLAMA_TEMPLATE, name="llama-test"))
    assert use.format == "llama-3"
    content, calls = read_calls(answer, use)
    assert (content, calls_of(calls)) == LLAMA_ANSWERS[answer]
    stream = CallStream(use)
    deltas = [d for i in range(0, len(answer), 3) for d in stream.feed(answer[i : i + 3])]
    last, called = stream.end()
    deltas += last
    assert ("".join(d.get("content", "") for d in deltas) or None) == LLAMA_ANSWERS[answer][0]
    names = [p["function"]["name"] for d in deltas for p in d.get("tool_calls", []) if p["function"].get("name")]
    assert names == [name for name, _ in LLAMA_ANSWERS[answer][1]] and called == bool(names)


# -- prompts -------------------------------------------------------------------------------------------------------

FED_BACK = ASK + [
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


def test_a_template_that_renders_tools_gets_them_and_the_conversation_as_it_is():
    template = ChatTemplate(HERMES_TEMPLATE, name="hermes-test")
    use = use_of(template)
    assert use.format == "hermes" and use.native == "hermes"
    messages, variables = with_tools(FED_BACK, use, template)
    assert messages == FED_BACK and variables == {"tools": use.tools}
    text = template.render(messages, add_generation_prompt=True, **variables)
    assert json.dumps(WEATHER["function"]["parameters"]) in text
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>18 C, sunny</tool_response>" in text


def test_the_fallback_lists_the_tools_and_writes_calls_and_results_as_text():
    template = ChatTemplate.named("chatml")
    use = use_of(template)
    assert use.native is None and use.format == "hermes"
    messages, variables = with_tools([{"role": "system", "content": "Be brief."}] + FED_BACK, use, template)
    assert variables == {}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n") and json.dumps(WEATHER) in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert messages[3]["content"] == "<tool_response>\n18 C, sunny\n</tool_response>"
    assert all(set(m) == {"role", "content"} for m in messages)  # what any template can render


@pytest.mark.parametrize("template", [None, LLAMA_TEMPLATE], ids=["hermes", "llama-3"])
def test_a_required_call_grammar_takes_valid_calls_only(smollm2_tokenizer_and_template, template):
    tokenizer, _ = smollm2_tokenizer_and_template
    use = use_of(ChatTemplate(template, name="t") if template else None, tool_choice="required",
                 parallel_tool_calls=False)
    grammar = call_grammar(use, tokenizer, tokenizer.vocab_size)
    key = "parameters" if use.format == "llama-3" else "arguments"

    def follows(arguments: dict, name: str = "get_weather") -> bool:
        call = json.dumps({"name": name, key: arguments})
        text = call if use.format == "llama-3" else f"<tool_call>\n{call}\n</tool_call>\n"
        matcher = grammar.matcher()
        try:
            for token in tokenizer.encode(text, add_special=False):
                matcher.accept(token)
        except CamelidError:
            return False
        return matcher.is_stopped

    assert follows({"city": "Paris", "unit": "celsius"})
    assert follows({"zone": "UTC"}, "get_time")
    assert not follows({"city": "Paris"})  # unit is required
    assert not follows({"city": "Paris", "unit": "kelvin"})  # not in the enum
    assert not follows({"city": "Paris", "unit": "celsius", "extra": 1})  # no keys beyond those declared
    assert not follows({"zone": "UTC"}, "get_mood")  # no such tool


# -- through the server --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(served_models):
    with live_server(served_models) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
            yield c


def streamed_calls(client, **kw) -> tuple[list[tuple[str, dict]], str, list]:
    calls: dict[int, dict] = {}
    finish, chunks = None, list(client.chat.completions.create(stream=True, **kw))
    for chunk in chunks:
        for choice in chunk.choices:
            for part in choice.delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = part.id or call["id"]
                call["name"] = (part.function.name if part.function else None) or call["name"]
                call["arguments"] += (part.function.arguments or "") if part.function else ""
            finish = choice.finish_reason or finish
    assert all(c["id"] for c in calls.values())
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish, chunks


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "one"])
def test_required_and_named_calls_are_valid_whole_and_streamed(client, choice, parallel):
    kw = dict(model="smollm2", messages=ASK, tools=[WEATHER, CLOCK], tool_choice=choice, parallel_tool_calls=parallel,
              temperature=0, max_tokens=300)
    answer = client.chat.completions.create(**kw).choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in answer.message.tool_calls]
    assert 1 <= len(calls) <= (MAX_CALLS if parallel and choice == "required" else 1)
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for name, arguments in calls:
        assert isinstance(choice, str) or name == choice["function"]["name"]
        jsonschema.validate(arguments, tools[name])
        assert set(arguments) <= set(tools[name]["properties"])  # the declared parameters, nothing else
    streamed, finish, _ = streamed_calls(client, **kw)
    assert (streamed, finish) == (calls, "tool_calls")  # greedy: the same calls, streamed


def test_tool_results_fed_back_reach_the_model(client, served_models):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    fed = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    answer = client.chat.completions.create(model="smollm2", messages=fed, tools=[WEATHER], temperature=0,
                                            max_tokens=30)
    alone = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], temperature=0,
                                           max_tokens=30)
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result are in the prompt
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


BAD_TOOLS = [  # (request fields, param at fault)
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER] * 129}, "tools"),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages"),  # no tool_call_id
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": "{}"}}]}]}, "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "1"}]}, "messages"),
]


@pytest.mark.parametrize("fields,param", BAD_TOOLS, ids=range(len(BAD_TOOLS)))
def test_malformed_tools_and_tool_messages_are_a_4xx_naming_them(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": "tiny", "messages": ASK, "max_tokens": 2, **fields})
    assert (caught.value.param or "").split(".")[0] == param, caught.value.message


# -- langchain-openai ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(client):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(model="smollm2", base_url=str(client.base_url), api_key="unused",
                                       temperature=0, max_tokens=200, max_retries=0)


def test_langchain_bind_tools_reads_the_calls(chat_model):
    from langchain_core.messages import HumanMessage, ToolMessage

    bound = chat_model.bind_tools([WEATHER, CLOCK], tool_choice="required")
    answer = bound.invoke([HumanMessage(ASK[0]["content"])])
    assert answer.tool_calls and all(c["name"] in ("get_weather", "get_time") for c in answer.tool_calls)
    streamed = None
    for chunk in bound.stream([HumanMessage(ASK[0]["content"])]):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in answer.tool_calls]
    results = [ToolMessage("18 C and sunny", tool_call_id=c["id"]) for c in answer.tool_calls]
    after = chat_model.bind_tools([WEATHER, CLOCK]).invoke([HumanMessage(ASK[0]["content"]), answer, *results])
    assert isinstance(after.content, str)


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_langchain_with_structured_output_in_all_three_methods(chat_model, method):
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """The weather in a city."""

        city: str = Field(max_length=40)
        temperature: int = Field(ge=-60, le=60)

    schema = Weather if method != "json_mode" else Weather.model_json_schema()
    structured = chat_model.with_structured_output(schema, method=method)
    answer = structured.invoke("Describe the weather in Paris as JSON with the keys city and temperature.")
    if method == "json_mode":  # JSON mode promises any JSON object, not the keys: a dict comes back
        assert isinstance(answer, dict)
    else:
        assert isinstance(answer, Weather) and answer.city
