// Predict page: send the picked or dropped images to POST /predict, draw top-k bars per image.
"use strict";

const drop = document.getElementById("drop");
const input = document.getElementById("files");
const results = document.getElementById("results");
let topK = 5;

function renderPrediction(prediction, file) {
  const card = el("div", "prediction");
  card.dataset.filename = prediction.filename;
  const img = el("img");
  img.src = URL.createObjectURL(file);
  img.alt = prediction.filename;
  card.append(img, el("h3", "", prediction.filename));
  const bars = el("div", "bars");
  for (const entry of prediction.top) {
    const row = el("div", "bar-row");
    row.dataset.class = entry.class;
    const percent = (100 * entry.probability).toFixed(1);
    const track = el("div", "bar-track");
    const bar = el("div", "bar");
    bar.style.width = percent + "%";
    track.append(bar);
    row.append(el("span", "label", entry.class), track, el("span", "value", percent + "%"));
    bars.append(row);
  }
  card.append(bars);
  return card;
}

async function classify(files) {
  if (!files.length) return;
  showError("");
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  let response;
  try {
    response = await fetch("/predict?top_k=" + topK, { method: "POST", body: form });
  } catch (err) {
    showError("The app did not answer: " + err);
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    showError(`Error ${response.status}: ${detail || response.statusText}`);
    return;
  }
  results.replaceChildren(
    ...body.predictions.map((prediction, i) => renderPrediction(prediction, files[i]))
  );
}

input.addEventListener("change", () => classify(Array.from(input.files)));
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  classify(Array.from(event.dataTransfer.files));
});

fetch("/model")
  .then((response) => response.json())
  .then((card) => {
    topK = card.limits.top_k;
    document.getElementById("model-name").textContent =
      `model ${card.name}: ${card.class_names.join(", ")}`;
    document.getElementById("limits").textContent =
      `Up to ${card.limits.max_files} images, ${(card.limits.max_request_bytes / 1e6).toFixed(0)} MB per request; ` +
      `JPEG, PNG, GIF, BMP or WebP. Images are classified, never stored.`;
  })
  .catch(() => {});
