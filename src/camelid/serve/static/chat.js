// The chat page: a multi-turn conversation with one served model, streamed from /v1/chat/completions.
// Model output is only ever set as textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // the turns so far, as the API wants them: {role, content}
let controller = null; // aborts the answer being streamed, if any
let chatNumber = 0; // "New chat" counts up, so an answer stopped by it does not land in the next chat

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  let response;
  try {
    response = await getJSON("/v1/models");
  } catch (error) {
    setStatus("cannot reach the server: " + error.message, true);
    return;
  }
  if (!response.ok) {
    select.replaceChildren();
    setStatus(await errorMessage(response), true);
    return;
  }
  const models = (await response.json()).data;
  select.replaceChildren(
    ...models.map((m) => {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      return option;
    })
  );
  if (models.some((m) => m.id === previous)) select.value = previous;
  setStatus(models.length ? "" : "this server serves no models", !models.length);
}

function addMessage(role, label, content) {
  const element = document.createElement("div");
  element.className = "message " + role;
  const roleLabel = document.createElement("span");
  roleLabel.className = "role";
  roleLabel.textContent = label;
  const note = document.createElement("span");
  note.className = "note";
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = content;
  element.append(roleLabel, note, text);
  $("messages").append(element);
  element.scrollIntoView({ block: "end" });
  return { element, note, text };
}

function chatRequest(model) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const request = { model, messages, stream: true };
  const temperature = parseFloat($("temperature").value);
  if (temperature >= 0 && temperature <= 2) request.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens >= 1) request.max_tokens = maxTokens;
  return request;
}

async function send() {
  const prompt = $("prompt").value;
  const model = $("model").value;
  if (controller || !prompt.trim()) return;
  if (!model) {
    setStatus("no model to ask (if the server wants an API key, set it above)", true);
    return;
  }
  conversation.push({ role: "user", content: prompt });
  const question = addMessage("user", "you", prompt);
  const answer = addMessage("assistant", model, "");
  answer.element.dataset.state = "streaming";
  $("prompt").value = "";
  setStatus("");
  controller = new AbortController();
  const thisChat = chatNumber;
  setBusy(true);

  let text = "";
  let state = "done";
  let note = "";
  try {
    const response = await postJSON("/v1/chat/completions", chatRequest(model), controller.signal);
    if (!response.ok) throw new Error(await errorMessage(response));
    let finished = false;
    for await (const data of serverEvents(response)) {
      if (data === "[DONE]") {
        finished = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          text += choice.delta.content;
          answer.text.textContent = text;
        }
        if (choice.finish_reason === "length") note = "cut off at max tokens";
      }
    }
    if (!finished) throw new Error("the answer was cut off (the connection closed)");
  } catch (error) {
    state = error.name === "AbortError" ? "stopped" : "error";
    note = state === "stopped" ? "stopped" : error.message;
  }
  controller = null;
  setBusy(false);
  if (thisChat !== chatNumber) return;

  if (!text && state !== "done") {
    // Nothing came back: take the turn back so the question can be sent again.
    conversation.pop();
    question.element.remove();
    answer.element.remove();
    $("prompt").value = prompt;
    setStatus(note, state === "error");
    return;
  }
  conversation.push({ role: "assistant", content: text });
  answer.element.dataset.state = state;
  answer.note.textContent = note;
}

function stop() {
  if (controller) controller.abort(); // closes the connection; the server then frees the model's row
}

function newChat() {
  stop();
  chatNumber += 1;
  conversation.length = 0;
  $("messages").replaceChildren();
  setStatus("");
}

bindKeyField($("api-key"), loadModels);
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);
loadModels();
