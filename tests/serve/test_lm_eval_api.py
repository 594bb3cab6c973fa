"""lm-evaluation-harness through `camelid serve`: its `local-completions` (log-likelihood multiple choice and
generation, batched, with the server's own tokenizer over /tokenize) and `local-chat-completions` give exactly the
scores of the in-process adapter (camelid.eval.lm_eval_adapter) on the same local tasks."""

import importlib
import json

import pytest
from helpers import FIXTURES, live_server, lm_eval_task

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")

importlib.import_module("lm_eval.models")  # registers local-completions (camelid's adapter fills the registry first)
from lm_eval.tasks import TaskManager  # noqa: E402

from camelid.eval.likelihood import read_questions  # noqa: E402
from camelid.eval.lm_eval_adapter import CamelidLM  # noqa: E402

@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> TaskManager:
    root = tmp_path_factory.mktemp("lm_eval_api")
    questions, _ = read_questions(FIXTURES / "choice_questions.jsonl")
    data = root / "questions.jsonl"  # answers as indices: a JSON column must have one type
    data.write_text("".join(json.dumps({"question": q.question, "choices": q.choices, "answer": q.answer}) + "\n"
                        for q in questions))
    (root / "tasks").mkdir()
    for name, kind in [("camelid_api_choice", "multiple_choice"), ("camelid_api_generate", "generate_until")]:
        (root / "tasks" / f"{name}.yaml").write_text(lm_eval_task(name, data, root / "cache", kind))
    return TaskManager(include_path=str(root / "tasks"), include_defaults=False)


def generations(out: dict, task: str) -> list[str]:
    return [sample["filtered_resps"][0] for sample in sorted(out["samples"][task], key=lambda x: x["doc_id"])]


def scores(out: dict, task: str) -> dict:
    return {k: v for k, v in out["results"][task].items() if not k.endswith("stderr,none") and k != "alias"}


@pytest.mark.slow
def test_local_completions_equals_the_in_process_adapter(served_models, tasks):
    smollm2 = next(m for m in served_models if m.name == "smollm2")
    names = ["camelid_api_choice", "camelid_api_generate"]
    local = lm_eval.simple_evaluate(model=CamelidLM(smollm2.loaded, batch_size=4), tasks=names, task_manager=tasks)
    with live_server(served_models) as url:
        args = (f"model=smollm2,base_url={url}/v1/completions,tokenizer_backend=remote,batch_size=4,"
                "num_concurrent=2,max_retries=1,tokenized_requests=True")
        served = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=names, task_manager=tasks)
    for task in names:
        assert scores(served, task) == scores(local, task), task
    assert 0.3 < scores(local, "camelid_api_choice")["acc,none"] < 1  # a real model, above chance (1/4)
    texts = generations(local, "camelid_api_generate")
    assert generations(served, "camelid_api_generate") == texts and sum(map(bool, texts)) > 15  # the same words


@pytest.mark.slow
def test_local_chat_completions_equals_the_in_process_adapter_with_its_chat_template(served_models, tasks):
    smollm2 = next(m for m in served_models if m.name == "smollm2")
    local = lm_eval.simple_evaluate(model=CamelidLM(smollm2.loaded, batch_size=4), tasks=["camelid_api_generate"],
                                    task_manager=tasks, apply_chat_template=True)
    with live_server(served_models) as url:
        args = f"model=smollm2,base_url={url}/v1/chat/completions,num_concurrent=2,max_retries=1"
        served = lm_eval.simple_evaluate(model="local-chat-completions", model_args=args,
                                         tasks=["camelid_api_generate"], task_manager=tasks, apply_chat_template=True)
    assert scores(served, "camelid_api_generate") == scores(local, "camelid_api_generate")
    texts = generations(local, "camelid_api_generate")
    assert generations(served, "camelid_api_generate") == texts and sum(map(bool, texts)) > 15
