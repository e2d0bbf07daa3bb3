// nanoclaw's JavaScript code-context driver: run by `node -e` inside a
// sandbox (embedded in the nanoclaw binary, never written to disk). Same
// protocol as python.py: JSON request lines on stdin; the user's output raw
// on fd 1 / fd 2; control records MARK + JSON + "\n" on fd 1; an end record
// on both streams after each cell. Cells run in the global scope
// (vm.runInThisContext), so var/let/const/function declarations persist.
'use strict';
const fs = require('fs');
const util = require('util');
const vm = require('vm');

const NONCE = process.env.NANOCLAW_CONTEXT_NONCE || '';
const CWD = process.env.NANOCLAW_CONTEXT_CWD || '';
delete process.env.NANOCLAW_CONTEXT_NONCE;
delete process.env.NANOCLAW_CONTEXT_CWD;
const MARK = '\x1e' + NONCE;

function record(obj, fd = 1) {
  fs.writeSync(fd, MARK + JSON.stringify(obj) + '\n');
}

function plain(value) {
  return typeof value === 'string' ? value : util.inspect(value, { depth: 4 });
}

globalThis.require = require;
globalThis.module = module;
// An interrupt between cells is ignored; during a cell, breakOnSigint
// turns it into an error.
process.on('SIGINT', () => {});

let count = 0;

async function cell(req) {
  const env = req.env || {};
  const saved = {};
  for (const k of Object.keys(env)) {
    saved[k] = process.env[k];
    process.env[k] = env[k];
  }
  count += 1;
  record({ type: 'number_of_executions', execution_count: count });
  try {
    let value = vm.runInThisContext(req.code || '', {
      filename: `<cell-${count}>`,
      breakOnSigint: true,
    });
    if (value && typeof value.then === 'function') value = await value;
    if (value !== undefined) {
      record({ type: 'result', text: plain(value), is_main_result: true });
    }
  } catch (e) {
    const err = e instanceof Error ? e : new Error(String(e));
    record({
      type: 'error',
      name: err.name || 'Error',
      value: err.message || '',
      traceback: err.stack || String(err),
    });
  } finally {
    for (const k of Object.keys(saved)) {
      if (saved[k] === undefined) delete process.env[k];
      else process.env[k] = saved[k];
    }
  }
  record({ type: 'end' }, 1);
  record({ type: 'end' }, 2);
}

function start() {
  if (CWD) {
    try {
      process.chdir(CWD);
    } catch (e) {
      record({ type: 'ready', error: `cannot use ${JSON.stringify(CWD)} as the working directory: ${e.code || e.message}` });
      process.exit(0);
    }
  }
  // Requests come on stdin (a pipe: read without blocking a thread, so
  // process.exit() in a cell exits at once).
  const input = process.stdin;
  let buf = '';
  let queue = Promise.resolve();
  input.setEncoding('utf8');
  input.on('data', (chunk) => {
    buf += chunk;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      let req;
      try {
        req = JSON.parse(line);
      } catch (_) {
        continue;
      }
      queue = queue.then(() => cell(req));
    }
  });
  input.on('end', () => process.exit(0));
  record({ type: 'ready' });
}

start();
