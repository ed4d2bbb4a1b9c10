// The dashboard's shell: sign-in, the page router (History API; every /ui/... path is
// served this app, so deep links work on reload), the live indicator and the alert bar.

import * as api from './api.js';
import {runsPage} from './runs.js';
import {runPage} from './run.js';
import {executorsPage, clusterPage} from './nodes.js';

const main = document.getElementById('main');
const alertBar = document.getElementById('alert');
const signout = document.getElementById('signout');
const live = document.getElementById('live');
let current = null;
let signedIn = false;
// Why the person was sent back to the prompt; kept until they sign in again, so that a
// click on a link meanwhile (which routes to the prompt again) does not hide the reason.
let loginMessage = '';

/** What every page gets. */
const ctx = {
  navigate,
  showError(err) {
    alertBar.textContent = err instanceof Error ? err.message : String(err);
    alertBar.hidden = false;
  },
  clearError() {
    alertBar.hidden = true;
    alertBar.textContent = '';
  },
};

export function navigate(url, replace = false) {
  if (replace) history.replaceState(null, '', url);
  else history.pushState(null, '', url);
  route();
}

function route() {
  if (current && current.destroy) current.destroy();
  current = null;
  ctx.clearError();
  main.replaceChildren();
  if (!signedIn) {
    showLogin(loginMessage);
    return;
  }
  const path = location.pathname.replace(/\/+$/, '') || '/ui';
  const params = new URLSearchParams(location.search);
  const run = path.match(/^\/ui\/runs\/([^/]+)$/);
  let page = 'runs';
  if (run) {
    current = runPage(main, decodeURIComponent(run[1]), params, ctx);
  } else if (path === '/ui/executors') {
    page = 'executors';
    current = executorsPage(main, ctx);
  } else if (path === '/ui/cluster') {
    page = 'cluster';
    current = clusterPage(main, ctx);
  } else {
    current = runsPage(main, params, ctx);
  }
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.page === page) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

function showLogin(message) {
  signout.hidden = true;
  main.replaceChildren(document.getElementById('login-tpl').content.cloneNode(true));
  document.title = 'Sign in · flotilla';
  const form = document.getElementById('login-form');
  const input = document.getElementById('token');
  const error = document.getElementById('login-error');
  if (message) {
    error.textContent = message;
    error.hidden = false;
  }
  input.focus();
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const t = input.value.trim();
    if (!t) return;
    api.token.set(t);
    input.value = '';
    if (await probe()) {
      signIn();
    } else {
      api.token.clear();
      error.textContent = 'The server refused this token. Check it and try again.';
      error.hidden = false;
      input.focus();
    }
  });
}

/** Whether the server takes our token (or needs none). */
async function probe() {
  try {
    await api.get('/api/v1/cluster?stale=true');
    return true;
  } catch (e) {
    if (e.status === 401 || e.status === 403) return false;
    // Any other answer means the token passed; the page shows the problem.
    return true;
  }
}

function signIn() {
  signedIn = true;
  loginMessage = '';
  signout.hidden = !api.token.get();
  api.startEvents();
  route();
}

api.onUnauthorized(() => {
  if (!signedIn) return;
  signedIn = false;
  api.token.clear();
  api.stopEvents();
  if (current && current.destroy) current.destroy();
  current = null;
  ctx.clearError();
  loginMessage = 'The server refused the token (it may have changed). Sign in again.';
  showLogin(loginMessage);
});

signout.addEventListener('click', () => {
  signedIn = false;
  loginMessage = '';
  api.token.clear();
  api.stopEvents();
  route();
});

api.onStatus((c) => {
  live.textContent = c ? 'live' : 'offline';
  live.classList.toggle('on', c);
  live.title = c ? 'Receiving live updates' : 'Live updates paused: pages refresh every few seconds';
});

// Links inside the app change the page without reloading it.
document.addEventListener('click', (ev) => {
  const a = ev.target.closest && ev.target.closest('a[href]');
  if (!a || ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || !url.pathname.startsWith('/ui')) return;
  ev.preventDefault();
  navigate(url.pathname + url.search);
});

window.addEventListener('popstate', route);

// Start: a kept token, or a server that needs none, goes straight in.
(async () => {
  if (api.token.get() || (await probe())) signIn();
  else route();
})();
