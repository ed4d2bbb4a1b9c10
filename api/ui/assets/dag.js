// A run's task graph as SVG: a layered drawing (columns are the server's `layer`: one
// right of the deepest parent), tasks ordered in each column by the barycentre of their
// neighbours (a few sweeps, which removes most crossings), edges as curves. Nodes keep
// a fixed readable size; a wide or tall graph scrolls in its frame instead of shrinking,
// so a 50-task run stays legible. Status changes only swap classes (no re-layout).

import {s} from './dom.js';

const W = 176;      // node width
const H = 44;       // node height
const GAP_X = 64;   // between columns
const GAP_Y = 14;   // between nodes of a column
const PAD = 12;
const SWEEPS = 4;
const MAX_LABEL = 22; // characters of a task name shown in a node (the full name is its tooltip)

/** The status class of a task (a task waiting for approval has its own). */
export function statusOf(task) {
  if (!task) return 'notstarted';
  if (task.status === 'notstarted' && task.waiting_approval && !task.approved) return 'waiting';
  return task.status;
}

export function layout(graph) {
  const byName = new Map(graph.tasks.map((t) => [t.name, t]));
  const columns = [];
  for (const t of graph.tasks) (columns[t.layer] ||= []).push(t.name);
  for (let i = 0; i < columns.length; i++) columns[i] ||= [];
  const parents = new Map(graph.tasks.map((t) => [t.name, t.depends.map((d) => d.task).filter((p) => byName.has(p))]));
  const children = new Map(graph.tasks.map((t) => [t.name, []]));
  for (const [c, ps] of parents) for (const p of ps) children.get(p).push(c);
  const pos = new Map();
  const index = () => columns.forEach((col) => col.forEach((n, i) => pos.set(n, i)));
  index();
  const bary = (n, nbrs) => {
    const xs = nbrs.get(n).map((m) => pos.get(m));
    return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : pos.get(n);
  };
  for (let sweep = 0; sweep < SWEEPS; sweep++) {
    const down = sweep % 2 === 0;
    const order = down ? columns.map((_, i) => i).slice(1) : columns.map((_, i) => i).reverse().slice(1);
    for (const c of order) {
      const nbrs = down ? parents : children;
      const keyed = columns[c].map((n, i) => [bary(n, nbrs), i, n]);
      keyed.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
      columns[c] = keyed.map((k) => k[2]);
      columns[c].forEach((n, i) => pos.set(n, i));
    }
  }
  const tallest = Math.max(1, ...columns.map((c) => c.length));
  const nodes = new Map();
  columns.forEach((col, ci) => {
    const offset = ((tallest - col.length) * (H + GAP_Y)) / 2;
    col.forEach((name, i) => {
      nodes.set(name, {name, x: PAD + ci * (W + GAP_X), y: PAD + offset + i * (H + GAP_Y)});
    });
  });
  const width = PAD * 2 + columns.length * W + Math.max(0, columns.length - 1) * GAP_X;
  const height = PAD * 2 + tallest * H + (tallest - 1) * GAP_Y;
  return {nodes, width, height};
}

/**
 * Draws `graph` with statuses from `run`; onSelect(name) on click or Enter/Space.
 * Returns {el, update(run), select(name)}.
 */
export function drawDag(graph, run, onSelect) {
  const {nodes, width, height} = layout(graph);
  const svg = s('svg', {
    class: 'dag', id: 'dag', width, height, viewBox: `0 0 ${width} ${height}`,
    role: 'group', 'aria-label': `Task graph: ${graph.tasks.length} tasks`,
  });
  svg.append(s('defs', {}, s('marker', {id: 'arrow', viewBox: '0 0 8 8', refX: 8, refY: 4, markerWidth: 8, markerHeight: 8, orient: 'auto'},
    s('path', {d: 'M0,0 L8,4 L0,8 z', class: 'arrowhead'}))));
  const edges = s('g', {class: 'edges'});
  for (const t of graph.tasks) {
    const to = nodes.get(t.name);
    for (const d of t.depends) {
      const from = nodes.get(d.task);
      if (!from) continue;
      const x1 = from.x + W, y1 = from.y + H / 2, x2 = to.x - 2, y2 = to.y + H / 2;
      const mx = (x1 + x2) / 2;
      const conds = d.conditions && d.conditions.length ? d.conditions : ['on_success'];
      const cls = conds.includes('on_success') ? 'edge' : 'edge edge-alt';
      edges.append(s('path', {class: cls, d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, 'marker-end': 'url(#arrow)'},
        s('title', {}, `${d.task} → ${t.name} (${conds.join(', ')})`)));
    }
  }
  svg.append(edges);
  const groups = new Map();
  for (const t of graph.tasks) {
    const n = nodes.get(t.name);
    const label = t.name.length > MAX_LABEL ? t.name.slice(0, MAX_LABEL - 1) + '…' : t.name;
    const status = s('text', {class: 'status', x: n.x + 10, y: n.y + 34});
    const title = s('title', {});
    const g = s('g', {class: 'node', tabindex: 0, role: 'button', 'data-task': t.name},
      title,
      s('rect', {x: n.x, y: n.y, width: W, height: H, rx: 6, ry: 6}),
      s('text', {class: 'name', x: n.x + 10, y: n.y + 18}, label),
      status);
    g.addEventListener('click', () => onSelect(t.name));
    g.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); onSelect(t.name); }
    });
    groups.set(t.name, {g, status, title, approval: t.needs_approval});
    svg.append(g);
  }
  function update(run) {
    for (const [name, {g, status, title}] of groups) {
      const task = run.tasks[name];
      const st = statusOf(task);
      g.setAttribute('class', `node st-${st}${g.classList.contains('selected') ? ' selected' : ''}`);
      g.setAttribute('data-status', st);
      const word = st === 'waiting' ? 'waiting for approval' : st;
      status.textContent = word;
      title.textContent = `${name}: ${word}`;
      g.setAttribute('aria-label', `task ${name}: ${word}`);
    }
  }
  function select(name) {
    for (const [n, {g}] of groups) g.classList.toggle('selected', n === name);
  }
  update(run);
  return {el: svg, update, select};
}
