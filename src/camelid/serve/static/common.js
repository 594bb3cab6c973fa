// Shared by the chat page and the arena: the API key (kept in this browser only), JSON requests, and a
// reader for server-sent events arriving on a fetch() response.
"use strict";

const KEY_STORAGE = "camelid.apiKey";

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

// Show the stored key in `input`, store what the person types, and call onChange after an edit.
function bindKeyField(input, onChange) {
  input.value = apiKey();
  input.addEventListener("change", () => {
    const key = input.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    if (onChange) onChange();
  });
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

function getJSON(url) {
  return fetch(url, { headers: requestHeaders() });
}

function postJSON(url, body, signal) {
  return fetch(url, { method: "POST", headers: requestHeaders(), body: JSON.stringify(body), signal });
}

// One line for a failed response: the server's error message (OpenAI's error shape), or the HTTP status.
async function errorMessage(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) {
    // not JSON: the status line says enough
  }
  if (response.status === 401) message += " (set the API key at the top of the page)";
  return message;
}

// Yield the data of each server-sent event of `response` as it arrives ("[DONE]" included).
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    // Line ends may be \r\n or \r; a \r at the very end waits for the next chunk, which may start with \n.
    const settled = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    buffer = buffer.slice(0, settled).replace(/\r\n?/g, "\n") + buffer.slice(settled);
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}
