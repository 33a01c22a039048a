// Review page: flagged images per class (GET /api/review); keep / drop / relabel each one
// (POST /api/review), which the app writes to the review CSV the audit stage reads.
"use strict";

const groupsBox = document.getElementById("groups");
const summary = document.getElementById("summary");

function markDecided(card, decision) {
  card.classList.remove("decided-keep", "decided-drop", "decided-relabel");
  card.dataset.decision = decision;
  if (decision) card.classList.add("decided-" + decision.split(":")[0]);
  card.querySelector(".status").textContent = decision ? "decision: " + decision : "";
}

async function decide(card, image, decision) {
  showError("");
  const response = await fetch("/api/review", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ id: image.id, path: image.path, decision }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    showError(`Error ${response.status}: ${detail}`);
    return;
  }
  markDecided(card, body.decision);
}

function renderCard(image, classes) {
  const card = el("div", "card");
  card.dataset.id = image.id;
  card.dataset.path = image.path;
  const img = el("img");
  img.alt = image.path;
  img.loading = "lazy";
  if (image.has_file) img.src = "/api/review/images/" + image.id;
  const facts = el("dl");
  const shown = [
    ["given", image.class_given], ["suggested", image.class_suggested],
    ["label quality", image.label_quality], ["OOD score", image.ood_score],
    ["split", image.split], ["verdict", image.verdict], ["file", image.path],
  ];
  for (const [name, value] of shown) facts.append(el("dt", "", name), el("dd", "", value));
  const buttons = el("div", "buttons");
  const keep = el("button", "keep", "keep");
  keep.addEventListener("click", () => decide(card, image, "keep"));
  const dropButton = el("button", "drop", "drop");
  dropButton.addEventListener("click", () => decide(card, image, "drop"));
  const select = el("select", "relabel-class");
  for (const name of classes.filter((c) => c !== image.class_given)) {
    const option = el("option", "", name);
    option.value = name;
    if (name === image.class_suggested) option.selected = true;
    select.append(option);
  }
  const relabel = el("button", "relabel", "relabel");
  relabel.addEventListener("click", () => decide(card, image, "relabel:" + select.value));
  const clear = el("button", "clear", "undo");
  clear.addEventListener("click", () => decide(card, image, ""));
  buttons.append(keep, dropButton, select, relabel, clear);
  card.append(img, facts, buttons, el("div", "status"));
  markDecided(card, image.decision);
  return card;
}

async function load() {
  const response = await fetch("/api/review");
  const data = await response.json();
  if (!data.available) {
    summary.className = "notice";
    summary.textContent = data.message;
    return;
  }
  const count = data.groups.reduce((n, group) => n + group.images.length, 0);
  summary.textContent =
    `${count} flagged image(s) from ${data.audit_csv}; decisions are saved to ${data.review_csv}.`;
  for (const group of data.groups) {
    const section = el("section", "group");
    section.dataset.class = group.class;
    section.append(el("h2", "", `${group.class} (${group.images.length})`));
    const cards = el("div", "cards");
    cards.append(...group.images.map((image) => renderCard(image, data.classes)));
    section.append(cards);
    groupsBox.append(section);
  }
}

load().catch((err) => showError("Could not load the review list: " + err));
