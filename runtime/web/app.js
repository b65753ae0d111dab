// The demo page: wires index.html to sphinx.js. State in <body data-state>: loading, ready, running,
// done or error; the last result goes to #result as JSON.

import { Sphinx, decodeImage } from "./sphinx.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const modelUrl = params.get("model") ?? "model/";
const maxNewTokens = Number(params.get("max_new_tokens") ?? 64);
const threads = params.has("threads") ? Number(params.get("threads")) : undefined; // wasm threads (default: up to 4)
let sphinx = null, image = null;
window.demo = { sphinx: null, image: null };

function setState(state, message) {
  document.body.dataset.state = state;
  $("status").textContent = message;
  $("go").disabled = !sphinx || !image || state === "running";
}

async function choose(file) {
  if (!file) return;
  try {
    image = null;
    image = await decodeImage(file);
    window.demo.image = image; // for scripts: the RGB pixels the model sees
    $("preview").src = URL.createObjectURL(file);
    $("preview").style.display = "block";
    setState(sphinx ? "ready" : "loading", `${file.name}: ${image.width}×${image.height}` + (sphinx ? "" : "; loading the model…"));
  } catch (e) {
    setState("error", e.message);
  }
}

// The bundled sample images, each with the questions it answers (samples/index.json, from the site builder):
// clicking one loads it and offers its questions; clicking a question asks it.
async function showSamples() {
  let samples;
  try {
    const response = await fetch("samples/index.json");
    if (!response.ok) return;
    samples = await response.json();
  } catch {
    return; // a site without samples: the gallery stays empty
  }
  for (const { image: name, questions } of samples) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.image = name;
    button.title = name;
    button.setAttribute("aria-pressed", "false");
    const img = document.createElement("img");
    img.src = `samples/${name}`;
    img.alt = name;
    button.append(img);
    button.addEventListener("click", async () => {
      for (const b of $("samples").children) b.setAttribute("aria-pressed", String(b === button));
      const blob = await (await fetch(`samples/${name}`)).blob();
      await choose(new File([blob], name, { type: blob.type }));
      $("suggestions").replaceChildren(...questions.map((q) => {
        const ask = document.createElement("button");
        ask.type = "button";
        ask.textContent = q;
        ask.addEventListener("click", () => {
          $("question").value = q;
          if (!$("go").disabled) $("ask").requestSubmit();
        });
        return ask;
      }));
    });
    $("samples").append(button);
  }
}
showSamples();

$("file").addEventListener("change", () => {
  $("suggestions").replaceChildren();
  for (const b of $("samples").children) b.setAttribute("aria-pressed", "false");
  choose($("file").files[0]);
});
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  choose(e.dataTransfer.files[0]);
});

$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question) return setState("error", "type a question first");
  $("answer").textContent = "";
  $("timings").replaceChildren();
  setState("running", "thinking…");
  try {
    let chunks = 0; // streamed pieces, as the page showed them
    const result = await sphinx.answer(image, question, {
      maxNewTokens, onText: (text) => { chunks += 1; $("answer").textContent += text; },
    });
    showTimings(result);
    $("result").textContent = JSON.stringify({ ...result, plan: undefined, encoded: result.plan.encoded, chunks });
    setState("done", `${result.promptLen} prompt tokens (${result.imageTokens} image), ` +
      `${result.tokenIds.length} generated, stop: ${result.stopReason}`);
  } catch (err) {
    setState("error", err.message);
  }
});

function showTimings({ timings: t }) {
  const rows = [
    ["preprocess", `${t.preprocess.toFixed(0)} ms`],
    [`vision (${t.views} views)`, `${t.vision.toFixed(0)} ms`],
    [`prefill (${t.prefillTokens} tokens)`, `${t.prefill.toFixed(0)} ms (${(t.prefillTokens / t.prefill * 1000).toFixed(0)} tok/s)`],
    [`decode (${t.decodeTokens} tokens)`, `${t.decode.toFixed(0)} ms` +
      (t.decodeTokens ? ` (${(t.decodeTokens / t.decode * 1000).toFixed(1)} tok/s)` : "")],
  ];
  $("timings").replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    for (const c of cells) tr.insertCell().textContent = c;
    return tr;
  }));
}

try {
  sphinx = window.demo.sphinx = await Sphinx.load(modelUrl, { threads, onProgress: (m) => setState("loading", `${m}…`) });
  setState("ready", `${sphinx.config.name} loaded (${sphinx.threads} wasm thread${sphinx.threads > 1 ? "s" : ""}); ` +
    (image ? "ask away" : "choose an image"));
} catch (e) {
  setState("error", `cannot load the model from ${modelUrl}: ${e.message}`);
}
