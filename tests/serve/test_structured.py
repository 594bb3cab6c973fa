"""Structured outputs through `camelid serve`: 100 random JSON schemas, each answered by SmolLM2 greedy and sampled,
in batches where constrained rows decode beside free ones; every answer must parse and validate (`jsonschema`)."""

import concurrent.futures
import json
import random

import pytest
from helpers import live_server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WORDS = ["name", "city", "color", "size", "tags", "score", "items", "owner", "kind", "notes", "level", "price"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema: nested objects, arrays, enums, required fields; strings and arrays kept short so that an
    answer ends within max_tokens."""
    keys = rng.sample(WORDS, rng.randint(1, 4 if depth == 0 else 2))
    properties = {key: random_value(rng, depth + 1) for key in keys}
    # no keys beyond these (as OpenAI's strict mode asks): an open object lets a greedy model add keys forever
    return {"type": "object", "properties": properties, "required": rng.sample(keys, rng.randint(0, len(keys))),
            "additionalProperties": False}


def random_value(rng: random.Random, depth: int) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum"] + (["object", "array"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 20)}
    if kind == "integer":
        return {"type": "integer", "minimum": 0, "maximum": 10 ** rng.randint(1, 6)}
    if kind == "number":
        # a multiple of 0.25 has at most two decimals: a bare number's digits are unbounded in llguidance's JSON,
        # and a greedy small model may write them until max_tokens (llama.cpp's converter caps them at 16)
        return {"type": "number", "minimum": -100, "maximum": 100, "multipleOf": 0.25}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2, True, None], rng.randint(1, 4))}
    if kind == "object":
        return random_schema(rng, depth)
    if kind == "array":
        return {"type": "array", "items": random_value(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    return {"type": "boolean"}


def ask(client, schema: dict, i: int, sampled: bool):
    kw = {"temperature": 1.0, "seed": i} if sampled else {"temperature": 0}
    answer = client.chat.completions.create(
        model="smollm2", max_tokens=300, messages=[{"role": "user", "content": "Give an example, in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}, **kw)
    return answer.choices[0]


@pytest.mark.slow
def test_100_random_schemas_greedy_and_sampled_beside_free_rows(served_models):
    rng = random.Random(20261207)
    schemas = [random_schema(rng) for _ in range(100)]
    for schema in schemas:
        jsonschema.Draft202012Validator.check_schema(schema)
    with live_server(served_models) as url, concurrent.futures.ThreadPoolExecutor(8) as pool:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        free = [pool.submit(client.completions.create, model="smollm2", prompt="Once upon a time", max_tokens=200,
                            temperature=0) for _ in range(4)]
        asked = {(i, sampled): pool.submit(ask, client, schema, i, sampled)
                 for i, schema in enumerate(schemas) for sampled in (False, True)}
        wrong = []
        for (i, sampled), future in asked.items():
            choice = future.result()
            try:
                assert choice.finish_reason == "stop", f"finish_reason {choice.finish_reason}"
                jsonschema.validate(json.loads(choice.message.content), schemas[i])
            except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
                wrong.append(f"schema {i} ({'sampled' if sampled else 'greedy'}): {str(exc)[:80]}: "
                             f"{choice.message.content!r:.200}")
        texts = {f.result().choices[0].text for f in free}
    assert not wrong, f"{len(wrong)} of 200 answers do not follow their schema:\n" + "\n".join(wrong)
    assert len(texts) == 1  # the free rows beside them are untouched by their neighbours' grammars
