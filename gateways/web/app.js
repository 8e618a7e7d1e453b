// The chat page: a client of PROTOCOL.md in the browser. Signs in with a
// token, keeps one WebSocket to the gateway (reconnecting with backoff),
// and after every (re)connect catches up by `sync` and `pull`, as any
// client must: what was sent while it was away never comes by push.
// Sends carry a client_msg_id and are retried with the same one, so a
// send the server took before the network dropped is never stored twice.
'use strict';

const PAGE = 30; // messages pulled at a time when scrolling back
const A = {
  token: localStorage.getItem('imflow.token') || '',
  me: null,
  ws: null,
  wsUrl: null,
  rid: 0,
  waiting: new Map(), // rid → {resolve, reject}
  convs: new Map(), // conversation_id → conversation
  open: null, // the conversation shown
  names: new Map(), // user_id → nickname
  presence: new Map(), // user_id → online, for the peers we follow
  groupNames: new Map(),
  peerRead: new Map(), // conversation_id → the peer's read seq (receipts)
  backoff: 500,
  stopped: false,
  lastTyping: 0,
  typingTimer: null,
};

// ---- the server ----

async function rest(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${A.token}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
  });
  return answer(r);
}

async function gatewayUrl() {
  if (!A.wsUrl) {
    const s = await answer(await fetch('/app/settings', { cache: 'no-store' }));
    A.wsUrl = s.ws_url
      || `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.hostname}:${s.ws_port}/ws`;
  }
  return A.wsUrl;
}

function connected() {
  return A.ws && A.ws.readyState === WebSocket.OPEN;
}

/** A request over the socket; resolves with the reply frame. */
function request(op, fields = {}) {
  return new Promise((resolve, reject) => {
    if (!connected()) { reject(new Error('offline')); return; }
    A.rid += 1;
    const rid = String(A.rid);
    const timer = setTimeout(() => {
      A.waiting.delete(rid);
      reject(new Error('no answer'));
    }, 15000);
    A.waiting.set(rid, {
      resolve: (f) => { clearTimeout(timer); resolve(f); },
      reject: (e) => { clearTimeout(timer); reject(e); },
    });
    A.ws.send(JSON.stringify({ op, rid, ...fields }));
  });
}

async function connect() {
  if (A.stopped) return;
  let url;
  try {
    url = await gatewayUrl();
  } catch (e) {
    retry();
    return;
  }
  const ws = new WebSocket(`${url}?token=${encodeURIComponent(A.token)}`);
  A.ws = ws;
  ws.onopen = async () => {
    A.backoff = 500;
    setOnline(true);
    try {
      await catchUp();
      await flushOutbox();
    } catch (e) {
      console.warn('catching up failed', e);
    }
  };
  ws.onmessage = (ev) => {
    let f;
    try { f = JSON.parse(ev.data); } catch (e) { return; }
    onFrame(f);
  };
  ws.onclose = () => {
    if (A.ws !== ws) return;
    A.ws = null;
    for (const w of A.waiting.values()) w.reject(new Error('offline'));
    A.waiting.clear();
    setOnline(false);
    retry();
  };
}

/** Try again later; a refused token sends the user back to sign in. */
async function retry() {
  if (A.stopped) return;
  const wait = A.backoff;
  A.backoff = Math.min(A.backoff * 2, 8000);
  setTimeout(async () => {
    try {
      await rest('GET', '/users/me');
    } catch (e) {
      if (e.status === 401) { signOut('Your token was refused or has expired: sign in again.'); return; }
    }
    connect();
  }, wait);
}

function setOnline(on) {
  const dot = $('#conn');
  dot.classList.toggle('on', on);
  dot.title = on ? 'online' : 'offline';
  dot.setAttribute('aria-label', dot.title);
  banner(on ? '' : 'Offline: reconnecting… Messages you send now go out when the connection is back.');
}

function banner(text) {
  $('#banner').textContent = text;
  $('#banner').hidden = !text;
}

// ---- frames ----

function onFrame(f) {
  if (f.rid !== undefined && A.waiting.has(f.rid)) {
    const w = A.waiting.get(f.rid);
    A.waiting.delete(f.rid);
    if (f.op === 'error') {
      const e = new Error(f.message || f.code);
      e.code = f.code;
      w.reject(e);
    } else {
      w.resolve(f);
    }
    return;
  }
  switch (f.op) {
    case 'push':
      for (const m of f.messages || []) arrived(m);
      renderList();
      break;
    case 'read': { // read on another device of ours
      const c = A.convs.get(f.conversation_id);
      if (c && f.seq > c.read_seq) {
        c.read_seq = f.seq;
        c.unread = unreadAfter(c, f.seq);
        renderList();
      }
      break;
    }
    case 'receipt':
      if (f.user_id !== A.me.user_id) {
        A.peerRead.set(f.conversation_id, Math.max(A.peerRead.get(f.conversation_id) || 0, f.seq));
        if (A.open && A.open.id === f.conversation_id) renderMessages();
      }
      break;
    case 'typing':
      if (A.open && A.open.id === f.conversation_id) showTyping(f.user_id);
      break;
    case 'presence':
      A.presence.set(f.user_id, f.online);
      subtitle();
      break;
    case 'kick':
      A.stopped = true;
      banner(`Signed out here: ${f.reason || 'signed in elsewhere'}. Reload the page to sign in again.`);
      break;
    default:
      break;
  }
}

// ---- conversations ----

function convOf(id) {
  let c = A.convs.get(id);
  if (!c) {
    c = {
      id, group_id: null, peer: null, max_seq: 0, read_seq: 0, min_seq: 1, unread: 0,
      last: null, pinned: false, muted: false, msgs: new Map(), from: null, outbox: new Map(),
    };
    if (id.startsWith('sg_')) c.group_id = id.slice(3);
    else if (id.startsWith('si_')) {
      const [a, b] = id.slice(3).split('_');
      c.peer = a === A.me.user_id ? b : a;
    }
    A.convs.set(id, c);
  }
  return c;
}

function singleId(a, b) {
  return a < b ? `si_${a}_${b}` : `si_${b}_${a}`;
}

function title(c) {
  if (c.group_id) return A.groupNames.get(c.group_id) || c.group_id;
  return A.names.get(c.peer) || c.peer;
}

function unreadAfter(c, seq) {
  let n = 0;
  for (const m of c.msgs.values()) if (m.seq > seq && m.sender !== A.me.user_id) n += 1;
  return Math.min(n, Math.max(0, c.max_seq - seq));
}

/** The server's conversation list, merged into ours; then fill the open one's gap. */
async function catchUp() {
  const r = await request('sync', { limit: 1000 });
  for (const s of r.conversations || []) {
    const c = convOf(s.conversation_id);
    Object.assign(c, {
      max_seq: s.max_seq, read_seq: s.read_seq, min_seq: s.min_seq || 1, unread: s.unread || 0,
      last: s.last_message || c.last, pinned: !!s.pinned, muted: !!s.muted,
    });
    if (s.group_id) c.group_id = s.group_id;
    if (s.peer) c.peer = s.peer;
  }
  groupsAsked = 0;
  refreshGroups();
  renderList();
  if (A.open) {
    await fillGap(A.open);
    renderMessages();
    markRead(A.open);
  }
}

function arrived(m) {
  const c = convOf(m.conversation_id);
  const fresh = m.seq > c.max_seq;
  if (fresh) c.max_seq = m.seq;
  if (!c.last || m.seq >= c.last.seq) c.last = m;
  if (m.group_id) c.group_id = m.group_id;
  if (m.sender === A.me.user_id) c.outbox.delete(m.client_msg_id);
  if (m.content_type === 1100 && m.content && c.msgs.has(m.content.seq)) {
    const r = c.msgs.get(m.content.seq);
    c.msgs.set(r.seq, { ...r, revoked: true, content: null });
  }
  const reading = A.open === c && !document.hidden;
  if (fresh && m.sender !== A.me.user_id && !reading) c.unread += 1;
  const highest = Math.max(0, ...c.msgs.keys());
  if (A.open === c) {
    c.msgs.set(m.seq, m);
    if (c.from === null) c.from = m.seq;
    // A push past a hole (messages sent while we were away): pull the hole.
    if (highest && m.seq > highest + 1) pull(c, highest + 1, m.seq - 1).then(() => renderMessages()).catch(() => {});
    renderMessages();
    if (reading) markRead(c);
    if (m.sender !== A.me.user_id) clearTyping();
  } else if (highest && m.seq === highest + 1) {
    c.msgs.set(m.seq, m);
  } else if (highest && m.seq > highest) {
    // What we hold must run without holes up to its newest: start again on open.
    c.msgs.clear();
    c.from = null;
  }
  if (c.group_id && !A.groupNames.has(c.group_id)) refreshGroups();
  if (!c.group_id && !A.names.has(c.peer)) nickname(c.peer);
}

let groupsAsked = 0;
function refreshGroups() {
  if (Date.now() - groupsAsked < 2000) return;
  groupsAsked = Date.now();
  rest('GET', '/users/me/groups').then((g) => {
    for (const x of g.groups || []) A.groupNames.set(x.group_id, x.name);
    renderList();
    if (A.open) renderHeader();
  }).catch(() => {});
}

async function nickname(user) {
  if (!user || A.names.has(user)) return;
  A.names.set(user, user);
  try {
    const p = await rest('GET', `/users/${encodeURIComponent(user)}`);
    A.names.set(user, p.nickname || user);
    renderList();
    if (A.open) renderHeader();
  } catch (e) { /* the id stands in */ }
}

// ---- history ----

async function pull(c, from, to) {
  if (to < from) return;
  const r = await request('pull', { conversation_id: c.id, from_seq: from, to_seq: to });
  for (const m of r.messages || []) c.msgs.set(m.seq, m);
}

/** Everything after the newest message we hold, up to max_seq. */
async function fillGap(c) {
  if (c.from === null) { await loadLatest(c); return; }
  let from = Math.max(0, ...c.msgs.keys()) + 1;
  while (from <= c.max_seq) {
    const to = Math.min(from + 999, c.max_seq);
    await pull(c, from, to);
    from = to + 1;
  }
}

async function loadLatest(c) {
  if (c.max_seq < 1) { c.from = c.min_seq; return; }
  const from = Math.max(c.min_seq, c.max_seq - PAGE + 1);
  await pull(c, from, c.max_seq);
  c.from = from;
}

async function loadOlder(c) {
  if (c.from === null || c.from <= c.min_seq || c.loading) return;
  c.loading = true;
  const box = $('#messages');
  const before = box.scrollHeight - box.scrollTop;
  try {
    const from = Math.max(c.min_seq, c.from - PAGE);
    await pull(c, from, c.from - 1);
    c.from = from;
  } finally {
    c.loading = false;
  }
  if (A.open === c) {
    renderMessages(false);
    box.scrollTop = box.scrollHeight - before;
  }
}

function markRead(c) {
  if (document.hidden || c.max_seq <= c.read_seq || !connected()) return;
  const seq = c.max_seq;
  request('read', { conversation_id: c.id, seq }).then(() => {
    if (seq > c.read_seq) c.read_seq = seq;
    c.unread = unreadAfter(c, c.read_seq);
    renderList();
  }).catch(() => {});
  c.unread = 0;
  renderList();
}

// ---- sending ----

function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

function send(c, text) {
  const item = { client_msg_id: newId(), text, state: 'waiting', at: Date.now() };
  c.outbox.set(item.client_msg_id, item);
  renderMessages();
  deliver(c, item);
}

async function deliver(c, item) {
  if (!connected()) { item.state = 'waiting'; return; }
  item.state = 'sending';
  const target = c.group_id ? { group_id: c.group_id } : { recv_id: c.peer };
  try {
    await request('send', {
      client_msg_id: item.client_msg_id, content_type: 101, content: { text: item.text }, ...target,
    });
    if (c.outbox.has(item.client_msg_id)) item.state = 'sent';
  } catch (e) {
    // Offline: sent again, with the same id, once connected.
    item.state = e.message === 'offline' || e.message === 'no answer' ? 'waiting' : 'failed';
    item.error = e.message;
  }
  if (A.open === c) renderMessages();
}

async function flushOutbox() {
  for (const c of A.convs.values()) {
    for (const item of c.outbox.values()) {
      if (item.state === 'waiting') deliver(c, item);
    }
  }
}

// ---- typing and presence ----

function showTyping(user) {
  $('#typing').textContent = `${A.names.get(user) || user} is typing…`;
  clearTimeout(A.typingTimer);
  A.typingTimer = setTimeout(clearTyping, 3000);
}

function clearTyping() {
  clearTimeout(A.typingTimer);
  $('#typing').textContent = '';
}

function typed() {
  const c = A.open;
  const now = Date.now();
  if (!c || now - A.lastTyping < 1000 || !connected()) return;
  A.lastTyping = now;
  request('typing', { conversation_id: c.id }).catch(() => {});
}

function subtitle() {
  const c = A.open;
  if (!c) return;
  const online = A.presence.get(c.peer);
  if (c.group_id) $('#subtitle').textContent = `group ${c.group_id}`;
  else $('#subtitle').textContent = online === undefined ? c.peer : `${c.peer} · ${online ? 'online' : 'offline'}`;
}

// ---- rendering ----

const COLORS = ['#2563eb', '#7c3aed', '#db2777', '#ea580c', '#16a34a', '#0891b2', '#4f46e5', '#b45309'];
function colorOf(s) {
  let h = 0;
  for (const ch of s) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return COLORS[h % COLORS.length];
}

const NOTICES = {
  1001: (m) => `${m.sender} created the group “${m.content.name}”`,
  1002: (m) => `${m.sender} added ${(m.content.user_ids || []).join(', ')}`,
  1003: (m) => `${m.sender} removed ${(m.content.user_ids || []).join(', ')}`,
  1004: (m) => `${m.content.user_id || m.sender} left`,
  1005: (m) => `${m.content.user_id} is now ${m.content.role}`,
  1006: (m) => `${m.sender} changed the group's ${Object.keys(m.content || {}).join(', ')}`,
  1007: (m) => `${m.sender} ${m.content.muted ? 'muted' : 'unmuted'} the group`,
  1008: (m) => `${m.sender} ${m.content.until ? 'muted' : 'unmuted'} ${m.content.user_id}`,
  1009: (m) => `${m.sender} dismissed the group`,
  1010: (m) => `${m.content.from} handed the group to ${m.content.to}`,
  1100: (m) => `${m.sender} revoked a message`,
};

function preview(m) {
  if (!m) return '';
  if (m.revoked) return 'message revoked';
  if (m.content_type >= 1000) return (NOTICES[m.content_type] || (() => 'notification'))(m);
  const c = m.content || {};
  switch (m.content_type) {
    case 101: case 106: return c.text || '';
    case 102: return `[picture] ${c.name || ''}`;
    case 103: return `[voice] ${c.name || ''}`;
    case 104: return `[video] ${c.name || ''}`;
    case 105: return `[file] ${c.name || ''}`;
    default: return JSON.stringify(m.content);
  }
}

function renderList() {
  if (!A.me) return;
  const list = [...A.convs.values()].filter((c) => c.max_seq > 0 || c === A.open || c.outbox.size);
  list.sort((a, b) => (b.pinned - a.pinned)
    || ((b.last ? b.last.send_time : 0) - (a.last ? a.last.send_time : 0))
    || a.id.localeCompare(b.id));
  const items = list.map((c) => {
    const name = title(c);
    return el('li', {
      class: `conv${c === A.open ? ' active' : ''}`, 'data-conv': c.id, tabindex: 0,
      onclick: () => openConv(c), onkeydown: (e) => { if (e.key === 'Enter') openConv(c); },
    },
    el('span', { class: 'avatar', 'data-color': colorOf(c.id) }, (name || '?').slice(0, 2)),
    el('span', { class: 'title' }, `${c.pinned ? '📌 ' : ''}${name}`),
    el('span', { class: 'when' }, c.last ? fmtTime(c.last.send_time) : ''),
    el('span', { class: 'preview' }, c.last ? `${c.group_id && c.last.content_type < 1000 ? `${c.last.sender}: ` : ''}${preview(c.last)}` : ''),
    c.unread > 0 ? el('span', { class: `badge${c.muted ? ' muted-conv' : ''}`, 'aria-label': `${c.unread} unread` }, c.unread > 99 ? '99+' : String(c.unread)) : el('span'));
  });
  $('#conversations').replaceChildren(...items);
  // Colours are set as properties: the page's policy allows no inline style attribute.
  for (const a of document.querySelectorAll('.avatar[data-color]')) a.style.background = a.dataset.color;
}

function renderHeader() {
  const c = A.open;
  $('#title').textContent = c ? title(c) : '';
  if (c) subtitle();
}

function renderMessages(stick = true) {
  const c = A.open;
  if (!c) return;
  const box = $('#messages');
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 60;
  const peerRead = A.peerRead.get(c.id) || 0;
  const seqs = [...c.msgs.keys()].sort((a, b) => a - b);
  const items = seqs.map((s) => {
    const m = c.msgs.get(s);
    const mine = m.sender === A.me.user_id;
    if (m.content_type >= 1000) {
      return el('li', { class: 'msg system', 'data-seq': m.seq }, el('div', { class: 'bubble' }, preview(m)));
    }
    const tick = mine && !c.group_id ? (m.seq <= peerRead ? ' · Read' : ' · Sent') : '';
    return el('li', { class: `msg${mine ? ' mine' : ''}${m.revoked ? ' revoked' : ''}`, 'data-seq': m.seq },
      c.group_id && !mine ? el('div', { class: 'who' }, A.names.get(m.sender) || m.sender) : null,
      el('div', { class: 'bubble' }, m.revoked ? 'This message was revoked' : preview(m)),
      el('div', { class: 'meta' }, `${fmtTime(m.send_time)}${tick}`));
  });
  for (const item of c.outbox.values()) {
    const state = { waiting: 'waiting for the connection', sending: 'sending…', sent: 'sent', failed: `not sent: ${item.error}` }[item.state];
    items.push(el('li', { class: `msg mine ${item.state === 'failed' ? 'failed' : 'pending'}`, 'data-pending': item.client_msg_id },
      el('div', { class: 'bubble' }, item.text),
      el('div', { class: 'meta' }, state,
        item.state === 'failed' ? el('button', { class: 'link', type: 'button', onclick: () => deliver(c, item) }, 'Retry') : null)));
  }
  $('#list').replaceChildren(...items);
  $('#older').hidden = !(c.from !== null && c.from > c.min_seq);
  if (stick && (atBottom || c.justOpened)) box.scrollTop = box.scrollHeight;
  c.justOpened = false;
}

async function openConv(c) {
  A.open = c;
  c.justOpened = true;
  $('#chat').classList.add('viewing');
  $('#empty').hidden = true;
  $('#messages').hidden = false;
  $('#composer').hidden = false;
  clearTyping();
  renderHeader();
  renderList();
  renderMessages();
  if (c.peer) {
    nickname(c.peer);
    request('subscribe_presence', { user_ids: [c.peer] })
      .then((r) => {
        for (const u of r.users || []) A.presence.set(u.user_id, u.online);
        subtitle();
      })
      .catch(() => {});
  }
  if (connected()) {
    try {
      await fillGap(c);
    } catch (e) {
      banner(`Could not load the messages: ${e.message}`);
    }
  }
  if (A.open !== c) return;
  c.justOpened = true;
  renderMessages();
  markRead(c);
  $('#text').focus();
}

function closeConv() {
  A.open = null;
  $('#chat').classList.remove('viewing');
  $('#empty').hidden = false;
  $('#messages').hidden = true;
  $('#composer').hidden = true;
  $('#title').textContent = '';
  $('#subtitle').textContent = '';
  renderList();
}

// ---- signing in and out ----

async function start() {
  try {
    A.me = await rest('GET', '/users/me');
  } catch (e) {
    signOut(e.status === 401 ? 'That token was refused or has expired.' : `Cannot reach the server: ${e.message}`);
    return;
  }
  localStorage.setItem('imflow.token', A.token);
  A.names.set(A.me.user_id, A.me.nickname || A.me.user_id);
  $('#me-name').textContent = A.me.nickname || A.me.user_id;
  $('#me-id').textContent = A.me.user_id;
  $('#login').hidden = true;
  $('#chat').hidden = false;
  A.stopped = false;
  connect();
}

function signOut(message) {
  A.stopped = true;
  localStorage.removeItem('imflow.token');
  if (A.ws) A.ws.close();
  A.ws = null;
  A.me = null;
  A.convs.clear();
  A.open = null;
  $('#chat').hidden = true;
  $('#login').hidden = false;
  $('#login-error').textContent = message || '';
}

$('#login-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  A.token = $('#token').value.trim();
  start();
});
$('#signout').addEventListener('click', () => signOut(''));
$('#back').addEventListener('click', closeConv);
$('#older').addEventListener('click', () => { if (A.open) loadOlder(A.open); });
$('#messages').addEventListener('scroll', () => {
  if (A.open && $('#messages').scrollTop < 40) loadOlder(A.open);
});
$('#composer').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = $('#text').value.trim();
  if (!text || !A.open) return;
  $('#text').value = '';
  send(A.open, text);
});
$('#text').addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey) {
    ev.preventDefault();
    $('#composer').requestSubmit();
  }
});
$('#text').addEventListener('input', typed);
$('#new-chat').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const peer = $('#new-peer').value.trim();
  $('#new-chat-error').textContent = '';
  try {
    await rest('GET', `/users/${encodeURIComponent(peer)}`);
  } catch (e) {
    $('#new-chat-error').textContent = e.status === 404 ? `There is no user ${peer}.` : e.message;
    return;
  }
  $('#new-peer').value = '';
  openConv(convOf(singleId(A.me.user_id, peer)));
});
$('#group-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('#group-error').textContent = '';
  const members = $('#group-members').value.split(/[\s,]+/).filter(Boolean);
  try {
    const g = await rest('POST', '/groups', { name: $('#group-name').value.trim(), members });
    A.groupNames.set(g.group_id, $('#group-name').value.trim());
    $('#group-form').reset();
    $('#new-group').open = false;
    const c = convOf(`sg_${g.group_id}`);
    c.group_id = g.group_id;
    if (connected()) await catchUp();
    openConv(c);
  } catch (e) {
    $('#group-error').textContent = e.message;
  }
});
document.addEventListener('visibilitychange', () => {
  if (!document.hidden && A.open) markRead(A.open);
});

if (A.token) start(); else signOut('');
