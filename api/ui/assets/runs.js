// The runs page: newest first, filtered by group and phase, paged; kept current by the
// event stream (any run event re-reads the page shown, a burst at most every 300 ms).

import * as api from './api.js';
import {h, fill, badge, fmtTime, elapsed} from './dom.js';

/** Runs per page. */
const PAGE_SIZE = 20;
const PHASES = ['queued', 'running', 'finished', 'cancelled', 'setuperror'];
/** How often the page re-reads while the event stream is down. */
const POLL_MS = 5000;

export function runsPage(root, params, ctx) {
  const group = params.get('group') || '';
  const phase = params.get('phase') || '';
  const start = params.get('start') || '';
  const after = params.get('after') || '';
  document.title = 'Runs · flotilla';

  const groupInput = h('input', {id: 'f-group', name: 'group', type: 'text', value: group, placeholder: '/project/42', spellcheck: 'false'});
  const phaseSelect = h('select', {id: 'f-phase', name: 'phase'},
    h('option', {value: ''}, 'any phase'),
    PHASES.map((p) => h('option', {value: p, selected: p === phase}, p)));
  const filters = h('form', {class: 'filters', role: 'search'},
    h('label', {for: 'f-group'}, 'Group'), groupInput,
    h('label', {for: 'f-phase'}, 'Phase'), phaseSelect,
    h('button', {type: 'submit'}, 'Filter'));
  filters.addEventListener('submit', (ev) => {
    ev.preventDefault();
    ctx.navigate(url({group: groupInput.value.trim(), phase: phaseSelect.value}));
  });
  phaseSelect.addEventListener('change', () => filters.requestSubmit());

  const tbody = h('tbody');
  const table = h('table', {class: 'runs', id: 'runs-table'},
    h('thead', {}, h('tr', {},
      h('th', {}, 'Run'), h('th', {}, 'Name'), h('th', {class: 'opt'}, 'Group'),
      h('th', {}, 'Phase'), h('th', {}, 'Result'), h('th', {class: 'opt'}, 'Tasks'),
      h('th', {class: 'opt'}, 'Started'), h('th', {}, 'Took'))),
    tbody);
  const empty = h('p', {class: 'empty', hidden: true}, 'No run matches.');
  const pager = h('nav', {class: 'pager', 'aria-label': 'Pages of runs'});
  root.append(h('h1', {}, 'Runs'), filters, h('div', {class: 'table-wrap'}, table), empty, pager);

  function url(q) {
    const u = new URLSearchParams();
    for (const [k, v] of Object.entries(q)) if (v) u.set(k, v);
    const s = u.toString();
    return '/ui/' + (s ? '?' + s : '');
  }

  let alive = true;
  let inflight = null;
  async function load() {
    if (inflight) inflight.abort();
    const ctl = new AbortController();
    inflight = ctl;
    const q = new URLSearchParams({limit: String(PAGE_SIZE)});
    if (group) q.set('group', group);
    if (phase) q.set('phase', phase);
    if (after) { q.set('start', after); q.set('asc', 'true'); } else if (start) q.set('start', start);
    try {
      const res = await api.get(`/api/v1/runs?${q}`, ctl.signal);
      if (!alive || ctl.signal.aborted) return;
      let runs = res.runs;
      if (after) {
        // A newer page read upwards: shown newest first; at the top, the first page.
        if (!res.more) { ctx.navigate(url({group, phase}), true); return; }
        runs = runs.reverse();
      }
      render(runs, after ? true : res.more);
      ctx.clearError();
    } catch (e) {
      if (e.name !== 'AbortError' && alive) ctx.showError(e);
    }
  }

  function render(runs, more) {
    fill(tbody, ...runs.map(row));
    empty.hidden = runs.length > 0;
    const links = [];
    if (start || after) links.push(h('a', {href: url({group, phase})}, '« Newest'));
    if ((start || after) && runs.length) links.push(h('a', {href: url({group, phase, after: runs[0].id})}, '‹ Newer'));
    if (more && runs.length) links.push(h('a', {href: url({group, phase, start: runs[runs.length - 1].id}), id: 'older'}, 'Older ›'));
    fill(pager, ...links);
  }

  function row(run) {
    const counts = {};
    for (const t of Object.values(run.tasks)) {
      const k = t.waiting_approval && !t.approved && t.status === 'notstarted' ? 'waiting' : t.status;
      counts[k] = (counts[k] || 0) + 1;
    }
    const href = `/ui/runs/${api.seg(run.id)}`;
    return h('tr', {'data-run': run.id, 'data-phase': run.phase},
      h('td', {}, h('a', {href}, `#${run.counter}`), h('span', {class: 'sub mono'}, run.id)),
      h('td', {}, h('a', {href}, run.name)),
      h('td', {class: 'opt mono'}, run.group),
      h('td', {}, badge(run.phase)),
      h('td', {}, run.result === 'unknown' ? '—' : badge(run.result)),
      h('td', {class: 'opt'}, Object.entries(counts).map(([k, n]) => badge(k, `${n} ${k}`))),
      h('td', {class: 'opt'}, fmtTime(run.start_time || run.enqueue_time)),
      h('td', {}, elapsed(run.start_time, run.end_time)));
  }

  const stopFresh = api.keepFresh(load, (e) => e.kind === 'run' || e.kind === 'task' || e.kind === 'resync', 300, POLL_MS);

  return {
    destroy() {
      alive = false;
      stopFresh();
      if (inflight) inflight.abort();
    },
  };
}
