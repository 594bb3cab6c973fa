"""The chat page and the arena in a real browser (Debian's headless Chromium, driven by Playwright), and the
arena API's answers to bad input, its key, and its votes file."""

import dataclasses
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import live_server

from camelid.serve import arena

httpx = pytest.importorskip("httpx")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000  # answers on a shared 2-core machine; a hang fails instead of waiting forever


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; its own browser download is not needed)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page (own storage) that records its script errors and every URL it asks for.

    The pages' Content-Security-Policy forbids eval, so tests wait on selectors, not on wait_for_function.
    """
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.script_errors, page.urls = [], []
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    page.on("request", lambda request: page.urls.append(request.url))
    yield page
    context.close()


def model(served_models, name):
    return next(m for m in served_models if m.name == name)


@pytest.fixture
def two_fast_models(served_models):
    """"tiny" twice under different names (one engine): an arena of two models that answer in about a second."""
    tiny = model(served_models, "tiny")
    return [tiny, dataclasses.replace(tiny, name="tiny-b")]


def sse_data(body: str) -> list[str]:
    return [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- the chat page -------------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_the_chat_page_streams_the_answer_the_api_gives(page, served_models):
    question = "What is the capital of France?"
    with live_server(served_models) as url:
        page.goto(url + "/")
        page.wait_for_selector("#model option[value=smollm2]", state="attached")
        page.select_option("#model", "smollm2")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "12")
        page.fill("#prompt", question)
        page.press("#prompt", "Enter")
        page.wait_for_selector(".message.assistant[data-state=done]")
        shown = page.text_content(".message.assistant .text")
        # The same question, greedy and not streamed: the page must show exactly what the API answers.
        expected = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "smollm2", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 12,
        }).json()["choices"][0]["message"]["content"]
    assert shown == expected and "Paris" in shown
    assert page.text_content(".message.user .text") == question
    assert page.input_value("#prompt") == ""
    assert page.script_errors == []
    assert all(u.startswith((url, "data:")) for u in page.urls), page.urls  # nothing external


@pytest.mark.browser
def test_the_second_turn_carries_the_first_and_text_is_never_html(page, served_models):
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    first, second = "<img src=x onerror=\"document.title='pwned'\">hello", "and then?"
    with live_server(served_models) as url:
        page.goto(url + "/")
        page.wait_for_selector("#model option[value=tiny]", state="attached")
        page.select_option("#model", "tiny")
        page.fill("#system", "You are terse.")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "6")
        page.fill("#prompt", first)
        page.click("#send")
        page.wait_for_selector(".message.assistant[data-state=done]")
        answer = page.text_content(".message.assistant .text")
        page.fill("#prompt", second)
        page.click("#send")
        page.wait_for_selector(".message.assistant:nth-of-type(4)[data-state=done]")
    assert answer
    assert len(sent) == 2 and sent[0]["stream"] is True and sent[0]["max_tokens"] == 6
    assert sent[1]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": first},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": second},
    ]
    assert page.text_content(".message.user .text") == first  # shown as text,
    assert page.locator("#messages img").count() == 0 and page.title() != "pwned"  # not made into an element
    assert page.script_errors == []


@pytest.mark.browser
def test_stop_ends_a_long_answer_and_frees_the_servers_row(page, served_models):
    smollm2 = model(served_models, "smollm2")
    with live_server(served_models) as url:
        page.goto(url + "/")
        page.wait_for_selector("#model option[value=smollm2]", state="attached")
        page.select_option("#model", "smollm2")
        page.fill("#max-tokens", "1000")  # half a minute of tokens here, unless stopped
        page.fill("#prompt", "Write a very long story about a camel crossing the desert.")
        before = smollm2.engine.generated_tokens
        page.click("#send")
        page.wait_for_selector(".message.assistant .text:not(:empty)")  # the first words are shown
        assert smollm2.engine.rows_in_use == 1
        page.click("#stop")
        page.wait_for_selector(".message.assistant[data-state=stopped]")
        shown = page.text_content(".message.assistant .text")
        # The browser closed the connection; the server cancels the job and its row is free again.
        assert wait_until(lambda: smollm2.engine.rows_in_use == 0, timeout=5)
        spent = smollm2.engine.generated_tokens - before
        time.sleep(0.5)
        assert smollm2.engine.generated_tokens - before == spent < 500
        assert page.text_content(".message.assistant .text") == shown
        assert page.text_content(".message.assistant .note") == "stopped"
        assert page.is_enabled("#send") and not page.is_enabled("#stop")
    assert page.script_errors == []


@pytest.mark.browser
def test_the_key_field_unlocks_a_server_with_a_key_and_is_remembered(page, served_models):
    with live_server(served_models, api_key="s3cret") as url:
        page.goto(url + "/")
        page.wait_for_selector("#status:has-text('API key')")
        assert page.locator("#model option").count() == 0
        page.fill("#api-key", "s3cret")
        page.press("#api-key", "Enter")  # Enter fires "change" on a text input
        page.wait_for_selector("#model option[value=tiny]", state="attached")
        page.reload()  # kept in this browser's localStorage
        page.wait_for_selector("#model option[value=tiny]", state="attached")
        assert page.input_value("#api-key") == "s3cret"
        page.select_option("#model", "tiny")
        page.fill("#max-tokens", "4")
        page.fill("#prompt", "hi")
        page.click("#send")
        page.wait_for_selector(".message.assistant[data-state=done]")
    assert page.script_errors == []


# -- the arena page ------------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_an_arena_battle_streams_two_answers_records_the_vote_and_reveals_the_names(page, two_fast_models,
                                                                                    short_answers, tmp_path):
    votes = tmp_path / "arena" / "votes.jsonl"  # its folder does not exist yet
    prompt = "Tell me about camels."
    with live_server(two_fast_models, votes=votes) as url:
        page.goto(url + "/arena")
        page.fill("#prompt", prompt)
        page.press("#prompt", "Enter")
        page.wait_for_selector("#side-a[data-state=done]")
        page.wait_for_selector("#side-b[data-state=done]")
        answers = page.text_content("#answer-a"), page.text_content("#answer-b")
        assert all(answers)
        assert page.text_content("#name-a") == page.text_content("#name-b") == ""  # blind until the vote
        assert not votes.exists()
        page.click("#vote-a")
        page.wait_for_selector("#side-a[data-revealed=true]")
        names = page.text_content("#name-a"), page.text_content("#name-b")
        assert all(page.is_disabled(f"#vote-{v}") for v in ("a", "b", "tie", "bothbad"))
    assert page.locator("#notice").is_hidden()
    [line] = votes.read_text(encoding="utf-8").splitlines()
    record = json.loads(line)
    assert (record["model_a"], record["model_b"]) == names and set(names) == {"tiny", "tiny-b"}
    assert record["winner"] == "model_a" and record["battle"]
    for side, answer in zip("ab", answers):
        assert record[f"conversation_{side}"] == [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": answer}]
    when = datetime.fromisoformat(record["time"])
    assert when.utcoffset() == timedelta(0) and abs(datetime.now(UTC) - when) < timedelta(minutes=5)
    assert page.script_errors == []
    assert all(u.startswith((url, "data:")) for u in page.urls), page.urls


@pytest.mark.browser
def test_the_arena_says_when_only_one_model_is_served(page, served_models, tmp_path):
    with live_server([model(served_models, "tiny")], votes=tmp_path / "votes.jsonl") as url:
        page.goto(url + "/arena")
        page.wait_for_selector("#notice", state="visible")
        assert "Only one model is served" in page.text_content("#notice")
    assert page.script_errors == []


# -- the arena API -------------------------------------------------------------------------------------------------


def battle_and_answers(client, prompt="hello") -> tuple[str, dict[str, str]]:
    """Start a battle and stream both answers to the end; the battle id and the text of each side."""
    started = client.post("/arena/api/battle", json={"prompt": prompt})
    assert started.status_code == 200, started.text
    battle = started.json()["battle"]
    answers = {}
    for side in "ab":
        done = client.post("/arena/api/answer", json={"battle": battle, "side": side})
        assert done.status_code == 200 and done.headers["content-type"].startswith("text/event-stream")
        events = sse_data(done.text)
        assert events[-1] == "[DONE]" and "finish_reason" in json.loads(events[-2])
        answers[side] = "".join(json.loads(e).get("text", "") for e in events[:-1])
    return battle, answers


def assert_error(response, status: int, param=None, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["param"] == param and body["error"]["code"] == code


@pytest.fixture
def short_answers(monkeypatch):
    monkeypatch.setattr(arena, "ARENA_MAX_TOKENS", 12)  # the tiny model babbles; a few words make the point


def test_a_vote_is_logged_once_with_the_servers_answers(two_fast_models, tmp_path, short_answers):
    votes = tmp_path / "votes.jsonl"
    with live_server(two_fast_models, votes=votes) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/arena/api/models").json() == {"models_in_arena": 2}
        battle, answers = battle_and_answers(client, "Name a desert animal.")
        # The client's own copy of the answers is not what gets logged.
        voted = client.post("/arena/api/vote", json={"battle": battle, "winner": "tie (bothbad)",
                                                     "conversation_a": "forged", "model_a": "forged"})
        assert voted.status_code == 200
        result = voted.json()
        assert result["winner"] == "tie (bothbad)" and {result["model_a"], result["model_b"]} == {"tiny", "tiny-b"}
        assert_error(client.post("/arena/api/vote", json={"battle": battle, "winner": "model_b"}), 409, "battle",
                     "already_voted")
        assert_error(client.post("/arena/api/answer", json={"battle": battle, "side": "a"}), 409, "side",
                     "answer_already_requested")
    [line] = votes.read_text(encoding="utf-8").splitlines()
    record = json.loads(line)
    assert {k: record[k] for k in ("battle", "model_a", "model_b", "winner")} == {"battle": battle, **result}
    assert record["conversation_a"][1] == {"role": "assistant", "content": answers["a"]}
    assert record["conversation_b"][1] == {"role": "assistant", "content": answers["b"]}


def test_bad_arena_requests_are_4xx_in_the_openai_error_shape(two_fast_models, tmp_path, short_answers):
    votes = tmp_path / "votes.jsonl"
    with live_server(two_fast_models, votes=votes) as url, httpx.Client(base_url=url, timeout=60) as client:
        for path in ("/arena/api/battle", "/arena/api/answer", "/arena/api/vote"):
            assert_error(client.post(path, content=b"{not json"), 400)
            assert_error(client.post(path, content=b"[1, 2]"), 400)
        assert_error(client.post("/arena/api/vote", json={"battle": "nope", "winner": "tie"}), 404, "battle",
                     "battle_not_found")
        assert_error(client.post("/arena/api/answer", json={"battle": "nope", "side": "a"}), 404, "battle",
                     "battle_not_found")
        assert_error(client.post("/arena/api/battle", json={"prompt": "  "}), 400, "prompt")
        assert_error(client.post("/arena/api/battle", json={"prompt": 5}), 400, "prompt")
        assert_error(client.post("/arena/api/battle", json={}), 400, "prompt")
        battle = client.post("/arena/api/battle", json={"prompt": "hi"}).json()["battle"]
        assert_error(client.post("/arena/api/answer", json={"battle": battle, "side": "c"}), 400, "side")
        assert_error(client.post("/arena/api/vote", json={"battle": battle, "winner": "model_a"}), 409, "battle",
                     "answers_not_finished")
        battle, _ = battle_and_answers(client)
        for winner in ("A", "model_c", "bothbad", None, 1):
            assert_error(client.post("/arena/api/vote", json={"battle": battle, "winner": winner}), 400, "winner")
        assert_error(client.post("/arena/api/vote", json={"battle": battle}), 400, "winner")
        assert client.post("/arena/api/vote", json={"battle": battle, "winner": "model_b"}).status_code == 200
    assert len(votes.read_text().splitlines()) == 1


def test_a_vote_that_cannot_be_written_says_where_and_can_be_sent_again(two_fast_models, tmp_path, short_answers):
    (tmp_path / "taken").write_text("a file where the votes folder should be")
    votes = tmp_path / "taken" / "votes.jsonl"
    with live_server(two_fast_models, votes=votes) as url, httpx.Client(base_url=url, timeout=60) as client:
        battle, _ = battle_and_answers(client)
        for _ in range(2):  # not counted as voted
            response = client.post("/arena/api/vote", json={"battle": battle, "winner": "tie"})
            assert_error(response, 500, code="votes_not_written")
            assert str(votes) in response.json()["error"]["message"]


def test_old_battles_are_forgotten(two_fast_models, tmp_path, monkeypatch):
    monkeypatch.setattr(arena, "MAX_BATTLES", 2)
    with live_server(two_fast_models, votes=tmp_path / "v.jsonl") as url, httpx.Client(base_url=url) as client:
        first, *_ = [client.post("/arena/api/battle", json={"prompt": "hi"}).json()["battle"] for _ in range(3)]
        assert_error(client.post("/arena/api/answer", json={"battle": first, "side": "a"}), 404, "battle",
                     "battle_not_found")


def test_the_api_key_guards_the_arena_api_but_not_the_pages(two_fast_models, tmp_path, short_answers):
    with live_server(two_fast_models, api_key="s3cret", votes=tmp_path / "v.jsonl") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            with httpx.Client(base_url=url, headers=headers) as client:
                assert_error(client.get("/arena/api/models"), 401, code="invalid_api_key")
                assert_error(client.post("/arena/api/battle", json={"prompt": "hi"}), 401, code="invalid_api_key")
                assert_error(client.post("/arena/api/vote", json={"battle": "x", "winner": "tie"}), 401,
                             code="invalid_api_key")
                assert client.get("/").status_code == client.get("/arena").status_code == 200
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer s3cret"}, timeout=60) as client:
            battle, _ = battle_and_answers(client)
            assert client.post("/arena/api/vote", json={"battle": battle, "winner": "tie"}).status_code == 200


def test_votes_go_to_arena_votes_jsonl_in_the_current_directory_by_default(two_fast_models, tmp_path,
                                                                           monkeypatch, short_answers):
    monkeypatch.chdir(tmp_path)
    with live_server(two_fast_models) as url, httpx.Client(base_url=url, timeout=60) as client:
        battle, _ = battle_and_answers(client)
        assert client.post("/arena/api/vote", json={"battle": battle, "winner": "model_b"}).status_code == 200
    assert json.loads((tmp_path / "arena-votes.jsonl").read_text())["battle"] == battle


def test_pages_are_served_with_their_files_and_a_strict_content_policy(served_models):
    with live_server(served_models) as url, httpx.Client(base_url=url) as client:
        for path in ("/", "/arena"):
            response = client.get(path)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in response.headers["content-security-policy"]
        for name in ("common.js", "chat.js", "arena.js", "style.css"):
            assert client.get(f"/static/{name}").status_code == 200


def test_appended_lines_never_interleave(tmp_path):
    # Each writer has its own lock, as two server processes would: whole lines come from one write each.
    path = tmp_path / "votes.jsonl"
    line = {str(i): "x" * 60_000 for i in range(4)}

    def write(i):
        lock = threading.Lock()
        for _ in range(20):
            arena.append_line(path, json.dumps({"writer": i, "text": line[str(i)]}), lock)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert sorted(r["writer"] for r in records) == sorted(list(range(4)) * 20)


def test_leaving_an_arena_answer_frees_its_row(two_fast_models, tmp_path):
    engine = two_fast_models[0].engine
    with live_server(two_fast_models, votes=tmp_path / "v.jsonl") as url, httpx.Client(base_url=url) as client:
        battle = client.post("/arena/api/battle", json={"prompt": "hi"}).json()["battle"]
        with client.stream("POST", "/arena/api/answer", json={"battle": battle, "side": "a"}) as answer:
            next(answer.iter_lines())  # the first words (all 512 tokens would take seconds here)
            assert engine.rows_in_use == 1
        assert wait_until(lambda: engine.rows_in_use == 0, timeout=5)
