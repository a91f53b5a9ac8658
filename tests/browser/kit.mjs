// Shared by the browser tests that drive a seeded server (clinic, smart-server, portal):
// the Chromium settings, the screenshot folder, and the helpers every such test used to
// carry a copy of. A test file fills `kit` in its `before` (each test file runs in its
// own process, so each has its own kit):
//
//   Object.assign(kit, { server, browser, problems, warnings });
//   const c = await newContext('doctor');       // watched for CSP violations and errors
//   const doc = await token(doctor);            // an API session token
//   await api('GET', '/api/v1/patients', doc);  // { status, body }
//   cli(['demo', 'seed', '--patients', '12']);  // the server's own CLI, same environment
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from './server.mjs';
import { watch } from './watch.mjs';

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
export const DESKTOP = { width: 1280, height: 800 };
export const PHONE = { width: 390, height: 844 };
// Screenshots land in docs/screenshots/ only when asked (SCREENSHOTS=1), so that an
// ordinary run leaves the work tree as it was.
export const SHOTS = process.env.SCREENSHOTS === '1'
  ? join(repoRoot, 'docs', 'screenshots')
  : mkdtempSync(join(tmpdir(), 'custodian-shots-'));

/** The running server and browser, and where problems and warnings are collected. */
export const kit = { server: null, browser: null, problems: [], warnings: [] };

export async function newContext(label, options = {}) {
  const c = await kit.browser.newContext({ baseURL: kit.server.baseURL, viewport: DESKTOP, ...options });
  c.setDefaultTimeout(15_000);
  await watch(c, label, kit.problems, kit.warnings);
  return c;
}

export async function shot(p, name) {
  await p.screenshot({ path: join(SHOTS, name), fullPage: true });
}

export function cli(args, input) {
  const r = spawnSync(kit.server.bin, args, {
    cwd: kit.server.cwd, env: kit.server.env, input, encoding: 'utf8', timeout: 300_000,
  });
  if (r.status !== 0) throw new Error(`custodian ${args.join(' ')}: ${r.status}\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

export async function api(method, path, token, body, contentType = 'application/json') {
  const res = await fetch(`${kit.server.baseURL}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body ? { 'content-type': contentType } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

export async function token(who) {
  const res = await fetch(`${kit.server.baseURL}/api/v1/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ username: who.username, password: who.password }),
  });
  assert.equal(res.status, 200, `API login of ${who.username}`);
  return (await res.json()).access_token;
}
