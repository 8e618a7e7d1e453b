// The operators' console: the pipeline drawn from the file the server
// runs, with live rates on its edges and queues and Kafka lag on its
// stages, the processes and their health, and a user and group lookup.
// Everything comes from the admin API (/admin/overview, /admin/users/…,
// /admin/groups/…) with the admin secret the operator types in.
'use strict';

const C = {
  secret: sessionStorage.getItem('imflow.admin') || '',
  timer: null,
  shape: '', // the pipeline last drawn, to redraw only when it changes
};
const POLL_MS = 1000;

async function admin(path) {
  const r = await fetch(path, { headers: { 'X-Admin-Secret': C.secret }, cache: 'no-store' });
  return answer(r);
}

function setStatus(text, kind) {
  const s = $('#status');
  s.textContent = text;
  s.className = `pill ${kind || ''}`;
}

function showLogin(message) {
  clearTimeout(C.timer);
  C.timer = null;
  $('#board').hidden = true;
  $('#signout').hidden = true;
  $('#login').hidden = false;
  $('#login-error').textContent = message || '';
  setStatus('signed out');
  $('#secret').focus();
}

function showBoard() {
  $('#login').hidden = true;
  $('#board').hidden = false;
  $('#signout').hidden = false;
}

async function tick() {
  try {
    const o = await admin('/admin/overview');
    showBoard();
    render(o);
    setStatus('live', 'good');
  } catch (e) {
    if (e.status === 401) {
      sessionStorage.removeItem('imflow.admin');
      showLogin('That admin secret was refused.');
      return;
    }
    setStatus('server unreachable', 'bad');
  }
  C.timer = setTimeout(tick, POLL_MS);
}

function render(o) {
  const reading = o.reading || { stages: [], processes: [] };
  const figures = new Map(reading.stages.map((s) => [s.stage, s]));
  const p = o.pipeline || {};
  $('#pipeline-file').textContent = p.file ? `${p.file} · ${o.mode}` : o.mode;
  $('#pipeline-error').textContent = p.error || o.error || '';
  if (p.stages) drawGraph(p, figures);
  const up = reading.processes.filter((x) => x.up).length;
  const ingest = p.stages ? p.stages.find((s) => s.kind === 'ingest') : null;
  const inRate = ingest && figures.get(ingest.name) ? figures.get(ingest.name).out_per_sec : 0;
  $('#summary').textContent =
    `${up}/${reading.processes.length} processes up · ${fmtCount(inRate)} messages/s in`;
  renderProcesses(reading.processes);
}

// ---- the graph ----

const W = 172; // a stage's box
const H = 104;
const GAP_X = 84;
const GAP_Y = 28;

/** Each stage's column (longest path from a source) and row. */
function layout(p) {
  const depth = new Map(p.stages.map((s) => [s.name, 0]));
  // Stages come in dependency order, so one pass settles every depth.
  for (const s of p.stages) {
    for (const e of p.edges) {
      if (e.from === s.name) depth.set(e.to, Math.max(depth.get(e.to), depth.get(s.name) + 1));
    }
  }
  const columns = [];
  for (const s of p.stages) {
    const d = depth.get(s.name);
    (columns[d] = columns[d] || []).push(s.name);
  }
  return columns;
}

function drawGraph(p, figures) {
  const box = $('#graph');
  const shape = JSON.stringify([p.stages, p.edges]);
  const columns = layout(p);
  const rows = Math.max(...columns.map((c) => c.length));
  // Wide screens draw left to right; a narrow one (a phone) top to bottom.
  const natural = columns.length * (W + GAP_X) - GAP_X + 40;
  const vertical = box.clientWidth > 0 && box.clientWidth < natural * 0.6;
  const key = shape + vertical;
  if (key !== C.shape) {
    C.shape = key;
    box.replaceChildren(buildGraph(p, columns, rows, vertical));
  }
  updateGraph(p, figures);
}

function position(columns, rows, vertical) {
  const at = new Map();
  columns.forEach((names, c) => {
    const offset = ((rows - names.length) * (vertical ? W + GAP_X / 3 : H + GAP_Y)) / 2;
    names.forEach((n, r) => {
      if (vertical) {
        at.set(n, { x: 20 + offset + r * (W + GAP_X / 3), y: 20 + c * (H + GAP_X * 0.75) });
      } else {
        at.set(n, { x: 20 + c * (W + GAP_X), y: 30 + offset + r * (H + GAP_Y) });
      }
    });
  });
  return at;
}

function buildGraph(p, columns, rows, vertical) {
  const at = position(columns, rows, vertical);
  let width = 0;
  let height = 0;
  for (const { x, y } of at.values()) {
    width = Math.max(width, x + W + 20);
    height = Math.max(height, y + H + 20);
  }
  const root = svg('svg', {
    class: 'graph', viewBox: `0 0 ${width} ${height}`, width, height,
    role: 'img', 'aria-label': 'the pipeline',
  });
  root.append(svg('defs', {}, svg('marker', {
    id: 'arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto',
  }, svg('path', { d: 'M0,0 L10,5 L0,10 z', fill: '#aab3c5' }))));
  for (const e of p.edges) {
    const a = at.get(e.from);
    const b = at.get(e.to);
    let d;
    let lx;
    let ly;
    if (vertical) {
      const [x1, y1, x2, y2] = [a.x + W / 2, a.y + H, b.x + W / 2, b.y];
      const mid = (y1 + y2) / 2;
      d = `M${x1},${y1} C${x1},${mid} ${x2},${mid} ${x2},${y2 - 2}`;
      [lx, ly] = [(x1 + x2) / 2 + 8, mid - 4];
    } else {
      const [x1, y1, x2, y2] = [a.x + W, a.y + H / 2, b.x, b.y + H / 2];
      const mid = (x1 + x2) / 2;
      d = `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2 - 2},${y2}`;
      [lx, ly] = [mid, (y1 + y2) / 2 - 7];
    }
    const via = e.transport === 'kafka'
      ? `${e.topic} ×${e.partitions}`
      : `memory ×${e.partitions}`;
    root.append(svg('g', { class: 'edge', 'data-edge': `${e.from}->${e.to}` },
      svg('path', { d, 'marker-end': 'url(#arrow)' }),
      svg('text', { class: 'rate', x: lx, y: ly, 'text-anchor': vertical ? 'start' : 'middle' }, '0/s'),
      svg('text', { class: 'via', x: lx, y: ly + (vertical ? 13 : 20), 'text-anchor': vertical ? 'start' : 'middle' }, via)));
  }
  for (const s of p.stages) {
    const { x, y } = at.get(s.name);
    root.append(svg('g', { class: 'node', 'data-stage': s.name, transform: `translate(${x},${y})` },
      svg('title', {}, `${s.name}: a ${s.kind} stage${s.process ? ` in process ${s.process}` : ''}`),
      svg('rect', { width: W, height: H, rx: 10 }),
      svg('text', { class: 'name', x: 12, y: 22 }, s.name),
      svg('text', { class: 'kind', x: 12, y: 38 }, s.kind),
      svg('text', { class: 'kind', x: 12, y: 52 }, s.process ? `process ${s.process}` : ''),
      svg('text', { class: 'figures', x: 12, y: 74 }, ''),
      svg('text', { class: 'lag', x: 12, y: 92 }, '')));
  }
  return root;
}

function updateGraph(p, figures) {
  for (const s of p.stages) {
    const node = $(`#graph .node[data-stage="${CSS.escape(s.name)}"]`);
    if (!node) continue;
    const f = figures.get(s.name) || {};
    // A source (ingest) has no input edge: what it takes from the doors is what it sends on.
    const source = !p.edges.some((e) => e.to === s.name);
    const inRate = (source ? f.out_per_sec : f.in_per_sec) || 0;
    const backlog = (f.queued || 0) + (f.uncommitted || 0);
    node.dataset.in = inRate.toFixed(1);
    node.querySelector('.figures').textContent =
      `in ${fmtCount(inRate)}/s · out ${fmtCount(f.out_per_sec || 0)}/s`;
    const parts = [`queue ${fmtCount(f.queued || 0)}`];
    if (p.edges.some((e) => e.to === s.name && e.transport === 'kafka')) {
      parts.push(`lag ${fmtCount(f.uncommitted || 0)}`);
    }
    if (f.p99_ms != null) parts.push(`p99 ${fmtCount(f.p99_ms)} ms`);
    if (f.errors_per_sec > 0) parts.push(`${fmtCount(f.errors_per_sec)} err/s`);
    node.querySelector('.lag').textContent = parts.join(' · ');
    node.classList.toggle('busy', inRate > 0);
    node.classList.toggle('backlog', backlog > 1000);
    node.classList.toggle('failing', (f.errors_per_sec || 0) > 0);
  }
  for (const e of p.edges) {
    const g = $(`#graph .edge[data-edge="${CSS.escape(`${e.from}->${e.to}`)}"]`);
    if (!g) continue;
    const rate = (figures.get(e.from) || {}).out_per_sec || 0;
    g.dataset.rate = rate.toFixed(1);
    g.querySelector('.rate').textContent = `${fmtCount(rate)}/s`;
    g.classList.toggle('flowing', rate > 0);
  }
}

// ---- processes ----

function renderProcesses(processes) {
  const rows = processes.map((p) => el('tr', { 'data-process': p.process },
    el('td', {}, p.process),
    el('td', {}, p.up
      ? el('span', { class: 'pill good' }, 'up')
      : el('span', { class: 'pill bad', title: p.error || '' }, `down: ${p.error || 'no answer'}`)),
    el('td', {}, p.up ? `${p.cpu_percent.toFixed(0)}%` : '–'),
    el('td', {}, p.up ? fmtBytes(p.memory_bytes) : '–'),
    el('td', { class: 'stages' },
      p.stages.map((s) => `${s.stage} ${fmtCount(s.in_per_sec || s.out_per_sec)}`).join(' · ') || '–')));
  $('#processes tbody').replaceChildren(...rows);
}

// ---- lookup ----

async function lookup(kind, id) {
  const out = $('#lookup-result');
  out.replaceChildren(el('p', { class: 'muted' }, 'Looking up…'));
  try {
    const v = await admin(`/admin/${kind}/${encodeURIComponent(id)}`);
    out.replaceChildren(kind === 'users' ? userCard(v) : groupCard(v));
  } catch (e) {
    if (e.status === 401) { showLogin('That admin secret was refused.'); return; }
    out.replaceChildren(el('p', { class: 'error' }, e.message));
  }
}

function jump(kind, id) {
  $('#lookup-kind').value = kind;
  $('#lookup-id').value = id;
  lookup(kind, id);
}

function userCard(v) {
  const pr = v.presence;
  return el('div', { 'data-user': v.profile.user_id },
    el('dl', {},
      el('dt', {}, 'User'), el('dd', {}, v.profile.user_id),
      el('dt', {}, 'Nickname'), el('dd', {}, v.profile.nickname || '–'),
      el('dt', {}, 'Presence'), el('dd', { class: 'presence' }, pr.online
        ? `online on platform ${pr.platforms.join(', ')}`
        : `offline${pr.last_seen ? `, last seen ${new Date(pr.last_seen).toLocaleString()}` : ''}`),
      el('dt', {}, 'Groups'), el('dd', { class: 'chips groups' },
        v.groups.length ? v.groups.map((g) => el('button', {
          type: 'button', onclick: () => jump('groups', g.group_id),
        }, `${g.name || g.group_id} (${g.role})`)) : 'none')));
}

function groupCard(v) {
  const g = v.group;
  return el('div', { 'data-group': g.group_id },
    el('dl', {},
      el('dt', {}, 'Group'), el('dd', {}, g.group_id),
      el('dt', {}, 'Name'), el('dd', {}, g.name),
      el('dt', {}, 'Owner'), el('dd', {}, g.owner),
      el('dt', {}, 'Members'), el('dd', { class: 'count' }, String(g.member_count)),
      el('dt', {}, 'State'), el('dd', {}, g.dismissed ? 'dismissed' : g.muted ? 'muted' : 'open'),
      el('dt', {}, v.total > v.members.length ? `First ${v.members.length}` : 'Who'),
      el('dd', { class: 'chips members' }, v.members.map((m) => el('button', {
        type: 'button', onclick: () => jump('users', m.user_id),
      }, m.role === 'member' ? m.user_id : `${m.user_id} (${m.role})`)))));
}

// ---- start ----

$('#login-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  C.secret = $('#secret').value;
  sessionStorage.setItem('imflow.admin', C.secret);
  $('#login-error').textContent = '';
  tick();
});
$('#signout').addEventListener('click', () => {
  sessionStorage.removeItem('imflow.admin');
  C.secret = '';
  showLogin('');
});
$('#lookup-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  lookup($('#lookup-kind').value, $('#lookup-id').value.trim());
});
window.addEventListener('resize', () => { C.shape = ''; });
if (C.secret) tick(); else showLogin('');
