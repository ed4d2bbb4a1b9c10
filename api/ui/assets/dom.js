// Small DOM and formatting helpers shared by the pages. Everything is built with
// createElement and text nodes: no HTML strings, so nothing a run carries (names,
// logs, errors) can inject markup.

/** h('a', {href: '/ui/', class: 'x'}, 'text', child) -> element. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export const SVG_NS = 'http://www.w3.org/2000/svg';

export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

const pad = (n) => String(n).padStart(2, '0');

/** Milliseconds since the epoch -> "2026-12-01 21:04:05" in the viewer's time zone. */
export function fmtTime(ms) {
  if (!ms) return '—';
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A duration in ms -> "850 ms", "12.3 s", "4 min 05 s", "2 h 03 min". */
export function fmtDuration(ms) {
  if (ms === undefined || ms === null || ms < 0) return '—';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const sec = ms / 1000;
  if (sec < 60) return `${sec.toFixed(1)} s`;
  const m = Math.floor(sec / 60);
  if (m < 60) return `${m} min ${pad(Math.floor(sec % 60))} s`;
  return `${Math.floor(m / 60)} h ${pad(m % 60)} min`;
}

/** Start and end (ms) -> the elapsed time, counting to now while not ended. */
export function elapsed(start, end) {
  if (!start) return '—';
  return fmtDuration((end || Date.now()) - start);
}

/** "3 s ago", "5 min ago". */
export function ago(ms) {
  if (!ms) return 'never';
  const d = Date.now() - ms;
  if (d < 1500) return 'just now';
  return `${fmtDuration(d).replace(/\.\d s$/, ' s')} ago`;
}

export function badge(kind, text) {
  return h('span', {class: `badge b-${kind}`}, text ?? kind);
}

/** Calls fn at most once per `ms`, at the end of a burst. */
export function debounce(fn, ms) {
  let t = null;
  const d = () => {
    clearTimeout(t);
    t = setTimeout(() => { t = null; fn(); }, ms);
  };
  d.cancel = () => clearTimeout(t);
  return d;
}

/** Replaces el's children, skipping null/false (DOM's replaceChildren would print "null"). */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}
