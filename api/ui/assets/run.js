// One run: its header and actions (stop, restart), the task graph coloured by status,
// the selected task's steps with times and exit codes and its approve button, and one
// step's log, followed live while the task runs and read from the store after.
// The event stream re-reads the run on each of its events (a burst at most every 150 ms).

import * as api from './api.js';
import {h, fill, badge, fmtTime, elapsed} from './dom.js';
import {drawDag, statusOf} from './dag.js';

/** Characters of a log kept on the page (the oldest are dropped past it). */
const MAX_LOG_CHARS = 2_000_000;
const POLL_MS = 3000;
const FINAL_RUN = ['finished', 'cancelled', 'setuperror'];
const FINAL_TASK = ['skipped', 'cancelled', 'stopped', 'success', 'failed'];

export function runPage(root, runId, params, ctx) {
  document.title = `Run ${runId} · flotilla`;
  const runPath = `/api/v1/runs/${api.seg(runId)}`;
  let run = null;
  let graph = null;
  let dag = null;
  let selected = params.get('task');
  let chosenStep = params.get('step');
  let logKey = null;
  let logCtl = null;
  let alive = true;

  const head = h('header', {class: 'run-head'});
  const actions = h('div', {class: 'actions', id: 'run-actions'});
  const dagWrap = h('div', {class: 'dag-wrap', id: 'dag-wrap'});
  const legend = h('p', {class: 'legend', 'aria-hidden': 'true'},
    ['notstarted', 'waiting', 'running', 'success', 'failed', 'stopped', 'cancelled', 'skipped']
      .map((st) => h('span', {class: `key st-${st}`}, st === 'waiting' ? 'waiting for approval' : st)));
  const taskPanel = h('section', {class: 'task-panel', id: 'task-panel', 'aria-label': 'Selected task'});
  const logTitle = h('span', {id: 'log-title'}, 'Log');
  const logState = h('span', {class: 'sub', id: 'log-state'});
  const logText = document.createTextNode('');
  const logPre = h('pre', {class: 'log', id: 'log', tabindex: 0, 'aria-label': 'Step log'}, logText);
  root.append(
    h('p', {class: 'crumbs'}, h('a', {href: '/ui/'}, 'Runs'), ' / ', h('span', {class: 'mono'}, runId)),
    head, actions,
    h('section', {class: 'graph'}, h('h2', {}, 'Tasks'), legend, dagWrap),
    h('div', {class: 'cols'}, taskPanel,
      h('section', {class: 'logs', 'aria-label': 'Log'}, h('h2', {}, logTitle, ' ', logState), logPre)));

  async function load() {
    try {
      const [r, g] = await Promise.all([
        api.get(runPath),
        graph ? Promise.resolve(graph) : api.get(`${runPath}/graph`).catch((e) => {
          if (e.status === 404 || e.status === 400) return null;
          throw e;
        }),
      ]);
      if (!alive) return;
      run = r;
      // A server without the graph route: tasks without edges, in one column.
      graph = g || {run_id: runId, tasks: Object.keys(r.tasks).map((name) => ({name, depends: [], layer: 0, steps: [], needs_approval: false}))};
      render();
    } catch (e) {
      if (alive) ctx.showError(e);
    }
  }

  function render() {
    const final = FINAL_RUN.includes(run.phase);
    document.title = `${run.name} #${run.counter} · flotilla`;
    fill(head, 
      h('h1', {}, run.name, ' ', h('span', {class: 'sub'}, `#${run.counter}`)),
      h('dl', {class: 'meta'},
        h('dt', {}, 'Phase'), h('dd', {id: 'run-phase', 'data-phase': run.phase}, badge(run.phase)),
        h('dt', {}, 'Result'), h('dd', {id: 'run-result'}, run.result === 'unknown' ? '—' : badge(run.result)),
        h('dt', {}, 'Group'), h('dd', {class: 'mono'}, run.group),
        h('dt', {}, 'Started'), h('dd', {}, fmtTime(run.start_time || run.enqueue_time)),
        h('dt', {}, 'Took'), h('dd', run.end_time ? {} : {'data-since': run.start_time || ''}, elapsed(run.start_time, run.end_time)),
        run.restarted_from ? [h('dt', {}, 'Restarted from'), h('dd', {}, h('a', {href: `/ui/runs/${api.seg(run.restarted_from)}`}, run.restarted_from))] : null),
      run.setup_errors && run.setup_errors.length
        ? h('ul', {class: 'error'}, run.setup_errors.map((e) => h('li', {}, e))) : null);

    const buttons = [];
    if (!final && !run.stop) {
      buttons.push(h('button', {type: 'button', id: 'stop', class: 'danger', onclick: () => act('stop', {action: 'stop'})}, 'Stop run'));
    }
    if (!final && run.stop) buttons.push(h('span', {class: 'sub'}, 'Stopping…'));
    if (final) {
      buttons.push(h('button', {type: 'button', id: 'restart', onclick: () => act('restart', {action: 'restart', from_start: false})}, 'Restart failed tasks'));
      buttons.push(h('button', {type: 'button', id: 'restart-all', class: 'quiet', onclick: () => act('restart', {action: 'restart', from_start: true})}, 'Restart from start'));
    }
    fill(actions, ...buttons);

    if (!dag) {
      dag = drawDag(graph, run, select);
      fill(dagWrap, dag.el);
    } else {
      dag.update(run);
    }
    if (!selected || !run.tasks[selected]) selected = defaultTask();
    dag.select(selected);
    renderTask();
    tick();
  }

  function defaultTask() {
    const order = graph.tasks.map((t) => t.name).filter((n) => run.tasks[n]);
    for (const want of ['running', 'waiting', 'failed']) {
      const n = order.find((name) => statusOf(run.tasks[name]) === want);
      if (n) return n;
    }
    return order[0] || null;
  }

  function select(name) {
    if (name === selected) return;
    selected = name;
    chosenStep = null;
    remember();
    dag.select(name);
    renderTask();
  }

  function remember() {
    const q = new URLSearchParams();
    if (selected) q.set('task', selected);
    if (chosenStep !== null) q.set('step', chosenStep);
    history.replaceState(null, '', `/ui/runs/${api.seg(runId)}${q.toString() ? '?' + q : ''}`);
  }

  async function act(what, body) {
    ctx.clearError();
    try {
      const res = await api.put(`${runPath}/actions`, body);
      if (what === 'restart' && res && res.id) {
        ctx.navigate(`/ui/runs/${api.seg(res.id)}`);
        return;
      }
      load();
    } catch (e) {
      ctx.showError(`${what === 'stop' ? 'Stop' : 'Restart'} refused: ${e.message}`);
    }
  }

  async function approve(task) {
    ctx.clearError();
    try {
      await api.put(`${runPath}/tasks/${api.seg(task)}/actions`, {action: 'approve'});
      load();
    } catch (e) {
      ctx.showError(`Approval of ${task} refused: ${e.message}`);
    }
  }

  function autoStep(task) {
    if (task.setup_step && task.setup_step.phase === 'failed') return 'setup';
    let i = task.steps.findIndex((st) => st.phase === 'running');
    if (i < 0) i = task.steps.findIndex((st) => st.phase === 'failed');
    if (i < 0 && task.setup_step && task.setup_step.phase === 'running') return 'setup';
    return String(Math.max(0, i));
  }

  function renderTask() {
    if (!selected) {
      fill(taskPanel, h('p', {class: 'empty'}, 'This run has no task.'));
      return;
    }
    const task = run.tasks[selected];
    const gt = graph.tasks.find((t) => t.name === selected) || {steps: [], depends: []};
    const st = statusOf(task);
    const step = chosenStep ?? autoStep(task);
    const canApprove = task.waiting_approval && !task.approved && !FINAL_RUN.includes(run.phase);
    const rows = [['setup', 'setup', task.setup_step]].concat(
      task.steps.map((s, i) => [String(i), (gt.steps[i] && gt.steps[i].label) || `step ${i}`, s]));
    fill(taskPanel, 
      h('h2', {}, selected, ' ', h('span', {id: 'task-status', 'data-status': st}, badge(st === 'waiting' ? 'waiting' : st, st === 'waiting' ? 'waiting for approval' : st))),
      task.error ? h('p', {class: 'error', id: 'task-error'}, task.error) : null,
      h('dl', {class: 'meta'},
        gt.depends.length ? [h('dt', {}, 'Needs'), h('dd', {}, gt.depends.map((d) => d.task).join(', '))] : null,
        h('dt', {}, 'Executor'), h('dd', {class: 'mono'}, task.executor_id || '—'),
        h('dt', {}, 'Started'), h('dd', {}, fmtTime(task.start_time)),
        h('dt', {}, 'Took'), h('dd', task.end_time || !task.start_time ? {} : {'data-since': task.start_time}, elapsed(task.start_time, task.end_time)),
        gt.needs_approval ? [h('dt', {}, 'Approval'), h('dd', {}, task.approved ? 'approved' : 'waiting for approval')] : null),
      canApprove ? h('p', {}, h('button', {type: 'button', id: 'approve', onclick: () => approve(selected)}, `Approve ${selected}`)) : null,
      h('div', {class: 'table-wrap'}, h('table', {class: 'steps', id: 'steps'},
        h('thead', {}, h('tr', {}, h('th', {}, 'Step'), h('th', {}, 'Phase'), h('th', {class: 'opt'}, 'Started'), h('th', {}, 'Took'), h('th', {}, 'Exit'))),
        h('tbody', {}, rows.map(([key, label, s]) => h('tr', {class: key === step ? 'chosen' : '', 'data-step': key},
          h('td', {}, h('button', {type: 'button', class: 'link', 'aria-pressed': String(key === step),
            onclick: () => { chosenStep = key; remember(); renderTask(); }}, key === 'setup' ? 'setup' : `${Number(key) + 1}. ${label}`)),
          h('td', {}, badge(s.phase)),
          h('td', {class: 'opt'}, fmtTime(s.start_time)),
          h('td', s.end_time || !s.start_time ? {} : {'data-since': s.start_time}, elapsed(s.start_time, s.end_time)),
          h('td', {class: 'mono'}, s.exit_status ?? '—')))))));
    const label = step === 'setup' ? 'setup' : ((gt.steps[Number(step)] && gt.steps[Number(step)].label) || `step ${Number(step) + 1}`);
    const follow = !FINAL_RUN.includes(run.phase) && !FINAL_TASK.includes(task.status);
    const key = `${selected}\u0000${step}`;
    if (key !== logKey && (task.steps.length || step === 'setup')) {
      logKey = key;
      openLog(selected, step, label, follow);
    }
  }

  async function openLog(task, step, label, follow) {
    if (logCtl) logCtl.abort();
    const ctl = new AbortController();
    logCtl = ctl;
    logText.data = '';
    logTitle.textContent = `Log · ${task} · ${label}`;
    logState.textContent = follow ? 'following…' : 'loading…';
    logPre.dataset.state = 'open';
    const url = `${runPath}/tasks/${api.seg(task)}/logs?step=${encodeURIComponent(step)}${follow ? '&follow=true' : ''}`;
    try {
      await api.streamText(url, (chunk) => {
        if (ctl.signal.aborted) return;
        const atBottom = logPre.scrollTop + logPre.clientHeight >= logPre.scrollHeight - 8;
        logText.appendData(chunk);
        if (logText.length > MAX_LOG_CHARS) logText.deleteData(0, logText.length - MAX_LOG_CHARS);
        if (atBottom) logPre.scrollTop = logPre.scrollHeight;
      }, ctl.signal);
      if (ctl.signal.aborted) return;
      logState.textContent = logText.length ? 'complete' : 'complete (empty)';
      logPre.dataset.state = 'complete';
    } catch (e) {
      if (e.name === 'AbortError' || ctl.signal.aborted) return;
      logState.textContent = e.status === 404 ? 'no log (yet)' : `cannot read the log: ${e.message}`;
      logPre.dataset.state = 'error';
      // A log not there yet is tried again on the next change of the run.
      logKey = null;
    }
  }

  // Running times count up without re-rendering anything else.
  function tick() {
    for (const el of root.querySelectorAll('[data-since]')) {
      const since = Number(el.dataset.since);
      if (since) el.textContent = elapsed(since, null);
    }
  }
  const ticker = setInterval(tick, 1000);

  const stopFresh = api.keepFresh(
    load, (e) => e.kind === 'resync' || (e.data && e.data.run_id === runId), 150, POLL_MS);

  return {
    destroy() {
      alive = false;
      stopFresh();
      clearInterval(ticker);
      if (logCtl) logCtl.abort();
    },
  };
}
