// The clerk page: ask for suggestions, show them as cards, and send back the accepted or corrected labels.
// Plain DOM code, no build step. Every value from the server is inserted as text, never as HTML.
"use strict";

const KEY_STORAGE = "sanshi-api-key";
const FALLBACK_NAMES = { category: "一级分类", sanshi: "三事类别", unit: "承办单位", appeal: "诉求类型" };
const REVIEW_REASONS = {
  low_confidence: "置信度低于复核阈值",
  ambiguous: "不止一个标签都有可能（或没有一个足够可信）",
  policy_conflict: "三事类别与承办单位在责任清单中不一致",
};

const state = { model: null, request: null, suggestion: null };
const $ = (id) => document.getElementById(id);

function apiKey() {
  return $("api-key").value.trim();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["X-API-Key"] = apiKey();
  return h;
}

function say(text, kind = "") {
  const box = $("message");
  box.textContent = text;
  box.className = "message" + (kind ? " " + kind : "");
}

// The server's error body names the field: {"error", "message", "detail": [{"field", "message"}]}.
async function errorText(response) {
  try {
    const body = await response.json();
    if (response.status === 401) return "接口密钥缺失或错误，请在左下方“接口密钥”中填写。（" + body.message + "）";
    if (response.status === 503 && body.error === "store_unavailable") {
      return "确认结果未保存：反馈数据库暂时无法写入，请稍后重新提交，或联系管理员。";
    }
    if (response.status === 503) return "模型正在加载，请稍后再试。";
    const first = (body.detail || [])[0];
    return first ? `请求有误：${first.field} — ${first.message}` : body.message || `HTTP ${response.status}`;
  } catch (e) {
    return `服务器返回 HTTP ${response.status}`;
  }
}

function targetName(target) {
  const info = state.model && state.model.targets[target];
  return (info && info.column) || FALLBACK_NAMES[target] || target;
}

function percent(x) {
  return Math.round(x * 100) + "%";
}

async function loadModel() {
  const chip = $("model-status");
  try {
    const response = await fetch("/v1/model", { headers: headers() });
    if (response.status === 503) {
      chip.textContent = "模型加载中…";
      setTimeout(loadModel, 2000);
      return;
    }
    if (!response.ok) {
      chip.textContent = "模型信息不可用";
      chip.className = "chip error";
      say(await errorText(response), "error");
      return;
    }
    state.model = await response.json();
    chip.textContent = `模型 ${state.model.name} · 版本 ${state.model.version}`;
    chip.className = "chip ready";
  } catch (e) {
    chip.textContent = "无法连接服务器";
    chip.className = "chip error";
    setTimeout(loadModel, 3000);
  }
}

function sanshiClass(label) {
  return state.model && state.model.sanshi_classes ? state.model.sanshi_classes[label] : null;
}

function paintSanshi(card, info) {
  card.style.borderLeftColor = info ? info.colour_hex : "";
  card.style.background = info ? info.colour_hex + "14" : "";
  const dl = card.querySelector(".sanshi-info");
  dl.replaceChildren();
  if (!info) {
    dl.hidden = true;
    return;
  }
  for (const [term, value] of [["处置方式", info.handling_mode], ["承办主体", info.handled_by],
                               ["办理时限", `${info.time_limit_days} 天`]]) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dl.append(dt, dd);
  }
  dl.hidden = false;
}

function renderCard(target, field) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  card.dataset.target = target;
  card.querySelector(".card-title").textContent = targetName(target);
  card.querySelector(".label").textContent = field.label;
  card.querySelector(".confidence-text").textContent = "置信度 " + percent(field.confidence);
  const bar = card.querySelector(".bar");
  bar.setAttribute("aria-valuenow", String(Math.round(field.confidence * 100)));
  card.querySelector(".bar-fill").style.width = percent(field.confidence);
  const marker = card.querySelector(".bar-threshold");
  if (field.threshold <= 1) {
    marker.style.left = `calc(${percent(field.threshold)} - 1px)`;
    marker.title = "复核阈值 " + percent(field.threshold);
  } else {
    marker.hidden = true;
  }
  if (field.needs_review) {
    card.classList.add("needs-review");
    card.querySelector(".badge.review").hidden = false;
    card.querySelector(".review-reasons").textContent =
      field.review_reasons.map((r) => REVIEW_REASONS[r] || r).join("；");
  }
  const reasons = card.querySelector(".reasons");
  if (field.reasons.length) {
    reasons.append("依据：");
    for (const term of field.reasons) {
      const span = document.createElement("span");
      span.className = "term";
      span.textContent = term;
      reasons.append(span);
    }
  }
  const others = field.top_k.filter((item) => item.label !== field.label);
  if (others.length) {
    card.querySelector(".alternatives").textContent =
      "其他可能：" + others.map((item) => `${item.label} ${percent(item.probability)}`).join("、");
  }
  if (field.sanshi) paintSanshi(card, field.sanshi);

  const select = card.querySelector(".choice-select");
  select.dataset.testid = "choice-" + target;
  const known = (state.model && state.model.targets[target] && state.model.targets[target].labels) || [];
  const labels = known.includes(field.label) ? known : [field.label, ...known];
  for (const label of labels) {
    const option = document.createElement("option");
    option.value = label;
    option.textContent = label === field.label ? `${label}（建议）` : label;
    select.append(option);
  }
  select.value = field.label;
  select.addEventListener("change", () => {
    card.querySelector(".badge.corrected").hidden = select.value === field.label;
    if (state.model && target === state.model.sanshi_target) paintSanshi(card, sanshiClass(select.value));
  });
  return card;
}

function render(suggestion) {
  const cards = $("cards");
  cards.replaceChildren();
  const order = state.model ? Object.keys(state.model.targets) : Object.keys(suggestion.fields);
  for (const target of order) {
    if (suggestion.fields[target]) cards.append(renderCard(target, suggestion.fields[target]));
  }
  const overall = $("overall");
  overall.hidden = false;
  if (suggestion.needs_review) {
    const n = Object.values(suggestion.fields).filter((f) => f.needs_review).length;
    overall.textContent = `有 ${n} 项建议需要人工复核，请逐项确认后提交。`;
    overall.className = "overall review";
  } else {
    overall.textContent = "各项建议的置信度均达到阈值，核对无误后可直接提交。";
    overall.className = "overall ok";
  }
  $("feedback-actions").hidden = false;
}

async function askForSuggestion(event) {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim()) {
    say("请先录入诉求内容。", "error");
    $("text").focus();
    return;
  }
  const request = { text };
  const title = $("title").value.trim();
  const id = $("record-id").value.trim();
  if (title) request.title = title;
  if (id) request.id = id;
  const button = $("suggest-button");
  button.disabled = true;
  say("正在分析…");
  try {
    const response = await fetch("/v1/suggest", { method: "POST", headers: headers(), body: JSON.stringify(request) });
    if (!response.ok) {
      say(await errorText(response), "error");
      return;
    }
    state.request = request;
    state.suggestion = await response.json();
    render(state.suggestion);
    say(`已生成建议（模型版本 ${state.suggestion.model_version}）。`, "success");
  } catch (e) {
    say("无法连接服务器：" + e.message, "error");
  } finally {
    button.disabled = false;
  }
}

async function submitFeedback() {
  if (!state.suggestion) return;
  const labels = {};
  const suggestion = {};
  for (const card of document.querySelectorAll("#cards .card")) {
    const target = card.dataset.target;
    labels[target] = card.querySelector(".choice-select").value;
    const field = state.suggestion.fields[target];
    suggestion[target] = { label: field.label, confidence: field.confidence };
  }
  const body = { ...state.request, model_version: state.suggestion.model_version, suggestion, labels,
                 received_at: localTimestamp() };
  const button = $("submit-feedback");
  button.disabled = true;
  try {
    const response = await fetch("/v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) {
      if (response.status === 401) $("settings").open = true;
      say(await errorText(response), "error");
      return;
    }
    const stored = await response.json();
    const corrected = stored.corrected.map(targetName);
    say(`已保存（反馈编号 ${stored.feedback_id}）：采纳 ${stored.accepted.length} 项` +
        (corrected.length ? `，更正 ${corrected.length} 项（${corrected.join("、")}）。` : "。"), "success");
  } catch (e) {
    say("无法连接服务器：" + e.message, "error");
  } finally {
    button.disabled = false;
  }
}

// 受理时间: local wall-clock time with its offset (RFC 3339); the server keeps the wall-clock time.
function localTimestamp() {
  const d = new Date();
  const pad = (n) => String(n).padStart(2, "0");
  const offset = -d.getTimezoneOffset();
  const sign = offset >= 0 ? "+" : "-";
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T` +
         `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}` +
         `${sign}${pad(Math.floor(Math.abs(offset) / 60))}:${pad(Math.abs(offset) % 60)}`;
}

function clearForm() {
  $("request-form").reset();
  $("text-count").textContent = "0 字";
  state.request = state.suggestion = null;
  $("cards").replaceChildren();
  $("overall").hidden = true;
  $("feedback-actions").hidden = true;
  say("");
}

document.addEventListener("DOMContentLoaded", () => {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, key.value.trim()));
  $("text").addEventListener("input", () => { $("text-count").textContent = `${$("text").value.length} 字`; });
  $("request-form").addEventListener("submit", askForSuggestion);
  $("clear-button").addEventListener("click", clearForm);
  $("submit-feedback").addEventListener("click", submitFeedback);
  loadModel();
});
