// The Node.js cluster peer: plain `http` + `cluster`, default scheduling (round-robin on Linux).
//   node bench/node_cluster.js --port P --workers N
// Answers the same paths as bench/apps.py:
//   /template   an HTML page equivalent to workers/examples/templates/page.html (120 of 200 products)
//   /slow/<ms>  wait ms (setTimeout), then the hello response
//   /spin?ms=<ms>  a busy loop until the process has used ms of CPU, then the hello response
//   otherwise   "Hello from node cluster worker ..." with X-Worker-Slot / X-Worker-Pid headers
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : dflt;
}
const host = arg('--host', '127.0.0.1');
const port = Number(arg('--port', '8000'));
const workers = Number(arg('--workers', '2'));

if (cluster.isPrimary) {
  if (cluster.schedulingPolicy !== cluster.SCHED_RR) {
    console.error('warning: cluster scheduling policy is not round-robin');
  }
  let ready = 0;
  for (let i = 0; i < workers; i++) cluster.fork({ BALANCER_WORKER_SLOT: String(i) });
  cluster.on('listening', () => {
    if (++ready === workers) console.log(`node cluster ${workers} workers serving on ${host}:${port} (pid ${process.pid})`);
  });
  cluster.on('exit', (w, code, signal) => console.error(`worker ${w.process.pid} exited ${code ?? signal}`));
  const stop = () => { for (const id in cluster.workers) cluster.workers[id].kill(); process.exit(0); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const slot = process.env.BALANCER_WORKER_SLOT || '-';
  const pid = String(process.pid);
  const products = [];
  for (let i = 0; i < 200; i++) {
    products.push({ id: i, name: `Product ${i}`, price: Math.round((5 + (i * 7919 % 9500) / 100) * 100) / 100,
                    tags: [1, 2, 3].map((k) => `tag${(i * k) % 17}`) });
  }
  const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&#34;', "'": '&#39;' };
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);

  // A small seeded PRNG (mulberry32) standing in for random.Random(seed): same work, not the same sample.
  function rng(seedText) {
    let a = 0;
    for (const ch of seedText) a = (Math.imul(a, 31) + ch.charCodeAt(0)) | 0;
    return () => {
      a = (a + 0x6D2B79F5) | 0;
      let t = Math.imul(a ^ (a >>> 15), 1 | a);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }
  function sample(list, k, rand) {
    const pool = list.slice();
    for (let i = 0; i < k; i++) {
      const j = i + Math.floor(rand() * (pool.length - i));
      [pool[i], pool[j]] = [pool[j], pool[i]];
    }
    return pool.slice(0, k);
  }
  function renderPage(seed) {
    const items = sample(products, 120, rng(seed));
    const title = 'balancer template example';
    const out = ['<!doctype html>\n<html lang="en">\n<head><meta charset="utf-8"><title>', esc(title),
      '</title></head>\n<body>\n<h1>', esc(title), '</h1>\n<p>Rendered by worker slot ', esc(slot),
      ' (pid ', pid, ').</p>\n<table>\n  <thead><tr><th>#</th><th>Name</th><th>Price</th><th>Tags</th></tr></thead>\n  <tbody>\n'];
    let total = 0;
    items.forEach((item, n) => {
      total += item.price;
      out.push('    <tr class="', n % 2 ? 'even' : 'odd', '">\n      <td>', String(item.id), '</td>\n      <td>',
        esc(item.name.toUpperCase()), '</td>\n      <td>', item.price.toFixed(2), '</td>\n      <td>',
        item.tags.map((t) => `<span class="tag">${esc(t)}</span>`).join(', '), '</td>\n    </tr>\n');
    });
    out.push('  </tbody>\n</table>\n<p>Total: ', total.toFixed(2), '</p>\n</body>\n</html>');
    return out.join('');
  }
  // Content-Length set explicitly, as aiohttp does (node would otherwise answer chunked).
  const HELLO = Buffer.from(`Hello from node cluster worker slot ${slot} (pid ${pid})\n`);
  function hello(res) {
    res.writeHead(200, { 'Content-Type': 'text/plain; charset=utf-8', 'Content-Length': HELLO.length,
                         'X-Worker-Slot': slot, 'X-Worker-Pid': pid });
    res.end(HELLO);
  }
  // As bench/apps.py's spin(): CPU time, not wall time (process.cpuUsage: this process's user + system us).
  function spin(query) {
    const m = /^ms=([0-9.]+)/.exec(query);
    const ms = m ? Math.min(Math.max(Number(m[1]) || 0, 0), 1000) : 0;
    const cpu = () => { const u = process.cpuUsage(); return u.user + u.system; };
    const end = cpu() + ms * 1000;
    while (cpu() < end) { /* busy */ }
  }
  http.createServer((req, res) => {
    const q = req.url.indexOf('?');
    const path = q >= 0 ? req.url.slice(0, q) : req.url;
    if (path === '/spin') {
      spin(q >= 0 ? req.url.slice(q + 1) : '');
      hello(res);
    } else if (path === '/template') {
      const seed = q >= 0 ? (new URLSearchParams(req.url.slice(q + 1)).get('seed') || '') : '';
      const body = Buffer.from(renderPage(seed));
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Content-Length': body.length,
                           'X-Worker-Slot': slot });
      res.end(body);
    } else if (path.startsWith('/slow/')) {
      const ms = Math.min(Math.max(parseInt(path.slice(6), 10) || 0, 0), 1000);
      setTimeout(() => hello(res), ms);
    } else {
      hello(res);
    }
  }).listen(port, host);
}
