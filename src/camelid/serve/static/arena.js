// The arena: one prompt, two anonymous models answering side by side, a vote, then the names.
// The server picks the models and keeps their names until the vote; model output is set as textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const voteButtons = ["vote-a", "vote-b", "vote-tie", "vote-bothbad"].map($);
let battle = null; // the current battle's id
let controller = null; // aborts both answers of the current battle

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

function setVoting(enabled) {
  for (const button of voteButtons) button.disabled = !enabled;
}

async function checkArena() {
  let response;
  try {
    response = await getJSON("/arena/api/models");
  } catch (error) {
    setStatus("cannot reach the server: " + error.message, true);
    return;
  }
  if (!response.ok) {
    setStatus(await errorMessage(response), true);
    return;
  }
  const count = (await response.json()).models_in_arena;
  const notice = $("notice");
  notice.hidden = count >= 2;
  if (count === 1) {
    notice.textContent = "Only one model is served here, so A and B are the same model answering twice. " +
      "Serve two or more (--model NAME=MODEL, repeated) for a real comparison.";
  } else if (count === 0) {
    notice.textContent = "No served model has a chat template, so the arena cannot ask any.";
  }
  setStatus("");
}

function clearSides() {
  for (const side of ["a", "b"]) {
    $("answer-" + side).textContent = "";
    $("name-" + side).textContent = "";
    $("side-" + side).dataset.state = "";
    delete $("side-" + side).dataset.revealed;
  }
}

// Stream one side's answer into its pane; resolves true when the whole answer arrived.
async function streamSide(id, side, signal) {
  const pane = $("side-" + side);
  const out = $("answer-" + side);
  pane.dataset.state = "streaming";
  try {
    const response = await postJSON("/arena/api/answer", { battle: id, side }, signal);
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of serverEvents(response)) {
      if (data === "[DONE]") {
        pane.dataset.state = "done";
        return true;
      }
      const event = JSON.parse(data);
      if (event.text) out.textContent += event.text;
    }
    throw new Error("the answer was cut off (the connection closed)");
  } catch (error) {
    pane.dataset.state = "error";
    if (error.name !== "AbortError") setStatus(`answer ${side.toUpperCase()}: ${error.message}`, true);
    return false;
  }
}

async function start() {
  const prompt = $("prompt").value;
  if (battle || !prompt.trim()) return;
  clearSides();
  setStatus("Starting…");
  $("start").disabled = true;
  let response;
  try {
    response = await postJSON("/arena/api/battle", { prompt });
  } catch (error) {
    response = null;
    setStatus("cannot reach the server: " + error.message, true);
  }
  if (response && !response.ok) setStatus(await errorMessage(response), true);
  if (!response || !response.ok) {
    $("start").disabled = false;
    return;
  }
  const id = (await response.json()).battle;
  battle = id;
  $("prompt").readOnly = true;
  controller = new AbortController();
  setStatus("Both models are answering…");
  const [a, b] = await Promise.all([streamSide(id, "a", controller.signal), streamSide(id, "b", controller.signal)]);
  if (battle !== id) return; // "New battle" was pressed meanwhile
  controller = null;
  if (a && b) {
    setVoting(true);
    setStatus("Which answer is better?");
  } else if (!$("status").classList.contains("error")) {
    setStatus("An answer did not complete; start a new battle.", true);
  }
}

async function vote(winner) {
  if (!battle) return;
  setVoting(false);
  let response;
  try {
    response = await postJSON("/arena/api/vote", { battle, winner });
  } catch (error) {
    setStatus("cannot reach the server: " + error.message, true);
    setVoting(true);
    return;
  }
  if (!response.ok) {
    setStatus(await errorMessage(response), true);
    if (response.status >= 500) setVoting(true);
    return;
  }
  const result = await response.json();
  $("name-a").textContent = result.model_a;
  $("name-b").textContent = result.model_b;
  $("side-a").dataset.revealed = $("side-b").dataset.revealed = "true";
  const choice = voteButtons.find((button) => button.dataset.winner === winner).textContent;
  setStatus(`Your vote, “${choice}”, is recorded. Press New battle for another round.`);
}

function newBattle() {
  if (controller) controller.abort();
  controller = null;
  battle = null;
  setVoting(false);
  clearSides();
  $("prompt").readOnly = false;
  $("prompt").value = "";
  $("start").disabled = false;
  setStatus("");
  $("prompt").focus();
}

bindKeyField($("api-key"), checkArena);
$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
for (const button of voteButtons) button.addEventListener("click", () => vote(button.dataset.winner));
$("new-battle").addEventListener("click", newBattle);
checkArena();
