// Browser test of passkeys (docs/passkeys.md): a real WebAuthn ceremony in Chromium with
// its virtual authenticator (Chrome DevTools Protocol, WebAuthn.addVirtualAuthenticator):
// a doctor adds a passkey on the dashboard, signs out, signs in with the passkey alone,
// then with the password and the passkey as the second factor; an administrator sees
// the passkey on the user's page. The pages' only script is the project's own
// (assets/app.js) under the strict CSP: every console error, page error and CSP
// violation fails the run (the last test).
//
//   cd tests/browser && npm ci && node --test passkeys.test.mjs   (or: bash tests/browser/run.sh)
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { ADMIN, repoRoot, startServer } from './server.mjs';
import { watch } from './watch.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
// Passkeys need a host name (browsers refuse an IP address as the relying party): the
// browser goes to localhost, mapped to the server's 127.0.0.1.
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--host-resolver-rules=MAP localhost 127.0.0.1',
];
const DESKTOP = { width: 1280, height: 800 };
const SHOTS = process.env.SCREENSHOTS === '1'
  ? join(repoRoot, 'docs', 'screenshots')
  : mkdtempSync(join(tmpdir(), 'custodian-shots-'));
const PW = 'Clinic-Pass-12345!';
const doctor = { username: 'doctor.keys', password: PW };

let server;
let browser;
let baseURL;
let context;
let page;
let cdp;
let authenticatorId;
const problems = [];
const warnings = [];

function cli(args, input) {
  const r = spawnSync(server.bin, args, {
    cwd: server.cwd, env: server.env, input, encoding: 'utf8', timeout: 300_000,
  });
  if (r.status !== 0) throw new Error(`custodian ${args.join(' ')}: ${r.status}\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

async function shot(p, name) {
  await p.screenshot({ path: join(SHOTS, name), fullPage: true });
}

async function signOut() {
  await Promise.all([
    page.waitForURL((u) => u.pathname === '/login'),
    page.getByRole('button', { name: 'Sign out', exact: true }).click(),
  ]);
}

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  server = await startServer({ env: { CUSTODIAN_RATE_LIMIT__ENABLED: 'false' } });
  baseURL = server.baseURL.replace('127.0.0.1', 'localhost');
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  cli(['user', 'create', '--username', doctor.username, '--role', 'doctor', '--password-stdin'], `${PW}\n`);
  context = await browser.newContext({ baseURL, viewport: DESKTOP });
  context.setDefaultTimeout(15_000);
  await watch(context, 'doctor', problems, warnings);
  page = await context.newPage();
  // A platform authenticator that keeps discoverable credentials and verifies its user.
  cdp = await context.newCDPSession(page);
  await cdp.send('WebAuthn.enable');
  ({ authenticatorId } = await cdp.send('WebAuthn.addVirtualAuthenticator', {
    options: {
      protocol: 'ctap2', transport: 'internal', hasResidentKey: true,
      hasUserVerification: true, isUserVerified: true, automaticPresenceSimulation: true,
    },
  }));
}, { timeout: 600_000 });

after(async () => {
  try {
    if (browser) await browser.close();
  } finally {
    if (server) await server.stop();
  }
  if (warnings.length) console.log(`console warnings (not failures):\n  ${warnings.join('\n  ')}`);
});

test('a doctor adds a passkey on the dashboard', { timeout: 120_000 }, async () => {
  await page.goto('/login');
  await page.locator('input[name=username]').fill(doctor.username);
  await page.locator('input[name=password]').fill(doctor.password);
  await Promise.all([
    page.waitForURL((u) => u.pathname !== '/login'),
    page.getByRole('button', { name: 'Sign in', exact: true }).click(),
  ]);
  await page.goto('/admin#passkeys');
  const card = page.locator('#passkeys');
  assert.match(await card.innerText(), /None yet/);
  await card.locator('input[name=name]').fill('This laptop');
  await Promise.all([
    page.waitForURL((u) => u.pathname === '/admin/passkeys'),
    card.getByRole('button', { name: 'Add a passkey' }).click(),
  ]);
  const text = await page.locator('#passkeys').innerText();
  assert.match(text, /Passkey added/);
  assert.match(text, /This laptop/);
  assert.equal(await page.locator('#passkeys ul.codes li').count(), 10, 'ten recovery codes, shown once');
  const { credentials } = await cdp.send('WebAuthn.getCredentials', { authenticatorId });
  assert.equal(credentials.length, 1);
  assert.equal(credentials[0].isResidentCredential, true, 'a discoverable credential');
  await shot(page, 'passkeys.png');
});

test('sign in with the passkey alone', { timeout: 60_000 }, async () => {
  await signOut();
  await Promise.all([
    page.waitForURL((u) => u.pathname !== '/login' && u.pathname !== '/login/passkey'),
    page.getByRole('button', { name: 'Sign in with a passkey' }).click(),
  ]);
  await page.goto('/admin#passkeys');
  assert.match(await page.locator('main').innerText(), new RegExp(doctor.username));
  assert.doesNotMatch(await page.locator('#passkeys').innerText(), /never/, 'last used is set');
});

test('the password, then the passkey as the second factor', { timeout: 60_000 }, async () => {
  await signOut();
  await page.locator('input[name=username]').fill(doctor.username);
  await page.locator('input[name=password]').fill(doctor.password);
  await page.getByRole('button', { name: 'Sign in', exact: true }).click();
  // The second step: the password again, and the passkey.
  const use = page.getByRole('button', { name: 'Use your passkey' });
  await use.waitFor();
  await page.locator('input[name=password]').fill(doctor.password);
  await Promise.all([
    page.waitForURL((u) => u.pathname !== '/login'),
    use.click(),
  ]);
  const { credentials } = await cdp.send('WebAuthn.getCredentials', { authenticatorId });
  assert.ok(credentials[0].signCount >= 2, `sign count ${credentials[0].signCount}`);
});

test('an administrator sees the passkey on the user page', { timeout: 60_000 }, async () => {
  const admin = await browser.newContext({ baseURL, viewport: DESKTOP });
  try {
    await watch(admin, 'admin', problems, warnings);
    const p = await admin.newPage();
    await p.goto('/login');
    await p.locator('input[name=username]').fill(ADMIN.username);
    await p.locator('input[name=password]').fill(ADMIN.password);
    await Promise.all([
      p.waitForURL((u) => u.pathname !== '/login'),
      p.getByRole('button', { name: 'Sign in', exact: true }).click(),
    ]);
    await p.goto('/admin/users');
    await Promise.all([
      p.waitForURL((u) => /^\/admin\/users\/.+/.test(u.pathname)),
      p.getByRole('link', { name: doctor.username }).click(),
    ]);
    const card = p.locator('#authenticators');
    assert.match(await card.innerText(), /This laptop/);
  } finally {
    await admin.close();
  }
});

test('on an IP address the pages offer no passkey (browsers refuse them there)', { timeout: 60_000 }, async () => {
  const c = await browser.newContext({ baseURL: server.baseURL, viewport: DESKTOP });
  try {
    await watch(c, 'by address', problems, warnings);
    const p = await c.newPage();
    await p.goto('/login');
    assert.match(new URL(p.url()).hostname, /^127\./);
    assert.equal(await p.getByRole('button', { name: 'Sign in with a passkey' }).count(), 0);
    assert.equal(await p.getByRole('button', { name: 'Sign in', exact: true }).count(), 1);
  } finally {
    await c.close();
  }
});

test('no page had a console error, an uncaught error or a CSP violation', () => {
  assert.deepEqual(problems, []);
});
