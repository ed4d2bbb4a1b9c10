// The API client of the dashboard: the token (typed once, kept in sessionStorage for
// this tab), JSON requests with the bearer header, streamed text (logs), and the event
// stream read with fetch so that the token travels in a header, never in a URL.
import {debounce} from './dom.js';

const TOKEN_KEY = 'flotilla.token';

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (t) => sessionStorage.setItem(TOKEN_KEY, t),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** A refused or failed request: the server's `{code, message}` when it sent one. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let unauthorized = () => {};
/** Called with the error whenever the server answers 401 or 403. */
export function onUnauthorized(fn) { unauthorized = fn; }

function headers(extra) {
  const hs = new Headers(extra || {});
  const t = token.get();
  if (t) hs.set('Authorization', `Bearer ${t}`);
  return hs;
}

async function errorOf(resp) {
  let code = `http_${resp.status}`;
  let message = `The server answered ${resp.status}${resp.statusText ? ' ' + resp.statusText : ''}.`;
  try {
    const body = await resp.json();
    if (body && typeof body.message === 'string') {
      code = body.code || code;
      message = body.message;
    }
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(resp.status, code, message);
}

async function send(path, init) {
  let resp;
  try {
    resp = await fetch(path, {cache: 'no-store', credentials: 'omit', ...init});
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'unreachable', `The server cannot be reached (${e.message}).`);
  }
  if (resp.status === 401 || resp.status === 403) {
    const e = await errorOf(resp);
    unauthorized(e);
    throw e;
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

export async function request(method, path, body, signal) {
  const init = {method, signal, headers: headers(body === undefined ? {} : {'Content-Type': 'application/json'})};
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await send(path, init);
  if (resp.status === 204) return null;
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

export const get = (path, signal) => request('GET', path, undefined, signal);
export const put = (path, body) => request('PUT', path, body);

/** Reads a text answer as it arrives (a log), calling onText with each decoded piece. */
export async function streamText(path, onText, signal) {
  const resp = await send(path, {headers: headers(), signal});
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    onText(dec.decode(value, {stream: true}));
  }
  const rest = dec.decode();
  if (rest) onText(rest);
}

/** Encodes one path segment (run ids and task names are URL-safe, but never trust that). */
export const seg = (x) => encodeURIComponent(x);

// ---- the event stream ----------------------------------------------------------------

const listeners = new Set();
const statusListeners = new Set();
let controller = null;
let running = false;
export let connected = false;

/** fn({kind: 'run'|'task'|'resync', data}) for every event; returns the unsubscribe. */
export function subscribe(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

/** Keeps a page fresh: loads it now, again (debounced by `debounceMs`) on every event
 *  `wanted(e)` accepts, and every `pollMs` while the event stream is down. Returns the
 *  function that stops all three. */
export function keepFresh(load, wanted, debounceMs, pollMs) {
  const reload = debounce(load, debounceMs);
  const unsubscribe = subscribe((e) => { if (wanted(e)) reload(); });
  const poll = setInterval(() => { if (!connected) load(); }, pollMs);
  load();
  return () => { unsubscribe(); reload.cancel(); clearInterval(poll); };
}

/** fn(connected) whenever the stream connects or drops. */
export function onStatus(fn) {
  statusListeners.add(fn);
  fn(connected);
}

function setConnected(c) {
  if (c === connected) return;
  connected = c;
  for (const fn of statusListeners) fn(c);
}

function emit(e) {
  for (const fn of [...listeners]) {
    try { fn(e); } catch (err) { console.error(err); }
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Starts reading /api/v1/events, reconnecting with back-off until stopEvents(). */
export function startEvents() {
  if (running) return;
  running = true;
  loop();
}

export function stopEvents() {
  running = false;
  if (controller) controller.abort();
  setConnected(false);
}

async function loop() {
  let backoff = 500;
  while (running) {
    controller = new AbortController();
    try {
      const resp = await send('/api/v1/events', {headers: headers({Accept: 'text/event-stream'}), signal: controller.signal});
      setConnected(true);
      backoff = 500;
      // Whatever happened while we were away: pages re-read what they show.
      emit({kind: 'resync'});
      await readEvents(resp);
    } catch (e) {
      if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
        running = false;
      }
    }
    setConnected(false);
    if (!running) break;
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 10000);
  }
}

async function readEvents(resp) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const {done, value} = await reader.read();
    if (done) return;
    buf += dec.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let kind = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue;
        const i = line.indexOf(':');
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
        if (field === 'event') kind = val;
        else if (field === 'data') data.push(val);
      }
      if (!data.length) continue;
      if (kind === 'lagged') {
        emit({kind: 'resync'});
        continue;
      }
      try {
        emit({kind, data: JSON.parse(data.join('\n'))});
      } catch { /* a malformed event is dropped, the next resync repairs */ }
    }
  }
}
