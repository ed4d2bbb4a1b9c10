// The executors page (archs, group, active tasks, last seen) and the cluster page
// (leader, term, nodes with roles and replication lag, quorum when the server reports
// it, maintenance). Neither has events: both re-read every few seconds while shown.

import * as api from './api.js';
import {h, fill, badge, ago, fmtTime} from './dom.js';

const REFRESH_MS = 3000;

function every(ms, fn) {
  fn();
  const t = setInterval(fn, ms);
  return () => clearInterval(t);
}

export function executorsPage(root, ctx) {
  document.title = 'Executors · flotilla';
  const tbody = h('tbody');
  const empty = h('p', {class: 'empty', hidden: true}, 'No executor is registered.');
  root.append(h('h1', {}, 'Executors'),
    h('div', {class: 'table-wrap'}, h('table', {id: 'executors'},
      h('thead', {}, h('tr', {},
        h('th', {}, 'Executor'), h('th', {}, 'Group'), h('th', {}, 'Archs'), h('th', {}, 'Active tasks'),
        h('th', {}, 'Last seen'), h('th', {class: 'opt'}, 'Options'))),
      tbody)),
    empty);
  let alive = true;
  const stop = every(REFRESH_MS, async () => {
    try {
      const res = await api.get('/api/v1/executors');
      if (!alive) return;
      const list = res.executors.slice().sort((a, b) => a.id.localeCompare(b.id));
      fill(tbody, ...list.map((e) => {
        const fresh = Date.now() - e.last_seen < 15000;
        return h('tr', {'data-executor': e.id},
          h('td', {class: 'mono'}, e.id, e.listen_url ? h('span', {class: 'sub'}, e.listen_url) : null),
          h('td', {}, e.group || '—'),
          h('td', {}, (e.archs || []).join(', ') || 'any'),
          h('td', {}, `${e.active_tasks} / ${e.active_tasks_limit || '∞'}`),
          h('td', {title: fmtTime(e.last_seen)}, badge(fresh ? 'success' : 'stale', ago(e.last_seen))),
          h('td', {class: 'opt'}, [e.dynamic ? 'dynamic' : 'static', e.allow_privileged_containers ? 'privileged allowed' : null].filter(Boolean).join(', ')));
      }));
      empty.hidden = list.length > 0;
      ctx.clearError();
    } catch (e) {
      if (alive) ctx.showError(e);
    }
  });
  return {destroy() { alive = false; stop(); }};
}

export function clusterPage(root, ctx) {
  document.title = 'Cluster · flotilla';
  const summary = h('dl', {class: 'cards', id: 'cluster-summary'});
  const tbody = h('tbody');
  const maint = h('div', {id: 'maintenance'});
  root.append(h('h1', {}, 'Cluster'), summary,
    h('h2', {}, 'Nodes'),
    h('div', {class: 'table-wrap'}, h('table', {id: 'nodes'},
      h('thead', {}, h('tr', {},
        h('th', {}, 'Node'), h('th', {class: 'opt'}, 'Address'), h('th', {}, 'Role'),
        h('th', {}, 'Matched index'), h('th', {}, 'Lag'))),
      tbody)),
    h('h2', {}, 'Maintenance'), maint);
  let alive = true;
  const card = (label, value, id) => [h('dt', {}, label), h('dd', id ? {id} : {}, value)];
  const stop = every(REFRESH_MS, async () => {
    try {
      const [c, m] = await Promise.all([api.get('/api/v1/cluster'), api.get('/api/v1/maintenance')]);
      if (!alive) return;
      fill(summary, 
        ...card('Leader', c.leader_id ?? 'none', 'leader'),
        ...card('Term', c.term),
        ...card('Commit index', c.commit_index),
        ...card('Applied', `${c.applied_index} (node ${c.node_id})`),
        ...('quorum' in c ? card('Quorum', badge(c.quorum ? 'success' : 'failed', c.quorum ? 'yes' : 'lost'), 'quorum') : []),
        ...card('Maintenance', badge(m.enabled ? 'stopped' : 'success', m.enabled ? 'on' : 'off'), 'maintenance-state'));
      fill(tbody, ...c.nodes.map((n) => h('tr', {'data-node': n.id},
        h('td', {}, String(n.id), n.id === c.leader_id ? h('span', {class: 'badge b-leader'}, 'leader') : null),
        h('td', {class: 'opt mono'}, n.addr),
        h('td', {}, n.role),
        h('td', {}, n.matched_index ?? '—'),
        h('td', {}, n.lag ?? '—'))));
      const nodes = Object.entries(m.nodes || {});
      fill(maint, 
        h('p', {}, m.enabled
          ? 'Maintenance mode is on: the scheduler is paused and only maintenance, export/import, cluster, health and metrics routes are served.'
          : 'Maintenance mode is off.'),
        nodes.length ? h('p', {class: 'sub'}, 'Seen by each node: ', nodes.map(([id, on]) => `node ${id}: ${on ? 'on' : 'off'}`).join(', ')) : null,
        m.unreachable && m.unreachable.length ? h('p', {class: 'error'}, `Not answering: node ${m.unreachable.join(', node ')}`) : null);
      ctx.clearError();
    } catch (e) {
      if (alive) ctx.showError(e);
    }
  });
  return {destroy() { alive = false; stop(); }};
}
