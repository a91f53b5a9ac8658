// Browser tests for Custodian's admin web pages: Playwright (playwright-core, no browser
// download) driving the system Chromium against a throwaway server.
//
//   cd tests/browser && npm ci && node --test admin.test.mjs     (or: bash tests/browser/run.sh)
//
// The top-level tests run in order and share one signed-in browser context. Every
// console error/warning, uncaught page error and CSP violation seen on any page is
// collected; the last test fails if there was any error or violation.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { ADMIN, repoRoot, startServer } from './server.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
// Screenshots land in docs/screenshots/ only when asked (SCREENSHOTS=1), so that an
// ordinary run leaves the work tree as it was.
const SHOTS = process.env.SCREENSHOTS === '1'
  ? join(repoRoot, 'docs', 'screenshots')
  : mkdtempSync(join(tmpdir(), 'custodian-shots-'));

const NURSE = { username: 'nurse.joy', email: 'nurse.joy@example.org', password: 'Nurse-Pass-12345!' };
const TOKEN_NAME = 'browser-test';

let server;
let browser;
let ctx; // the signed-in desktop context
let page;

const problems = []; // console errors, page errors, CSP violations: fail the run
const warnings = []; // console warnings: listed, not failed on
const notes = []; // things to report that are not failures (e.g. wide tables on a phone)
const state = {}; // facts handed from one step to the next

/** Record console messages, page errors and CSP violations of every page of `context`. */
async function watch(context, label) {
  await context.exposeBinding('__cspReport', ({ page: p }, v) => {
    problems.push(`[${label}] CSP violation on ${p.url()}: ${v.effectiveDirective} blocked ${v.blockedURI || '(inline)'} `
      + `at ${v.sourceFile || '?'}:${v.lineNumber || '?'} (${v.sample || 'no sample'})`);
  });
  await context.addInitScript(() => {
    window.__csp = [];
    document.addEventListener('securitypolicyviolation', (e) => {
      const v = {
        effectiveDirective: e.effectiveDirective, violatedDirective: e.violatedDirective,
        blockedURI: e.blockedURI, sourceFile: e.sourceFile, lineNumber: e.lineNumber, sample: e.sample,
      };
      window.__csp.push(v);
      if (typeof window.__cspReport === 'function') window.__cspReport(v);
    });
  });
  const onPage = (p) => {
    p.on('console', (m) => {
      const where = m.location();
      const line = `[${label}] console.${m.type()} on ${p.url()}: ${m.text()}`
        + (where && where.url ? ` (${where.url}:${where.lineNumber})` : '');
      if (m.type() === 'error') problems.push(line);
      else if (m.type() === 'warning') warnings.push(line);
    });
    p.on('pageerror', (err) => problems.push(`[${label}] uncaught error on ${p.url()}: ${err.stack || err}`));
  };
  context.pages().forEach(onPage);
  context.on('page', onPage);
}

async function newContext(label, options = {}) {
  const c = await browser.newContext({ baseURL: server.baseURL, viewport: DESKTOP, ...options });
  c.setDefaultTimeout(15_000);
  c.setDefaultNavigationTimeout(30_000);
  await watch(c, label);
  return c;
}

async function shot(p, name) {
  await p.screenshot({ path: join(SHOTS, name), fullPage: true });
}

async function expectBanner(p) {
  const banner = p.locator('.phi-banner');
  assert.equal(await banner.count(), 1, `PHI banner on ${p.url()}`);
  assert.match(await banner.innerText(), /Protected health information/);
}

/** The value of <dd> after the <dt> with this text in the first dl.facts. */
async function fact(p, dt) {
  return (await p.locator('dl.facts dt', { hasText: dt }).first().locator('xpath=following-sibling::dd[1]').innerText()).trim();
}

/** Wait (polling) until fn() is truthy; returns its value. */
async function until(fn, { timeout = 10_000, interval = 250, what = 'condition' } = {}) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

/**
 * Whether the document overflows horizontally and, if so, the outermost elements that
 * stick out past the right edge (outside any horizontally scrolling container).
 */
async function overflow(p) {
  return p.evaluate(() => {
    const vw = window.innerWidth;
    const doc = document.documentElement.scrollWidth;
    const scrolls = (el) => {
      for (let a = el.parentElement; a; a = a.parentElement) {
        const ox = getComputedStyle(a).overflowX;
        if (a !== document.documentElement && a !== document.body && (ox === 'auto' || ox === 'scroll' || ox === 'hidden')) return true;
      }
      return false;
    };
    const describe = (el) => {
      let s = el.tagName.toLowerCase();
      if (el.id) s += `#${el.id}`;
      if (el.classList.length) s += `.${[...el.classList].join('.')}`;
      const section = el.closest('section[id], section h2') || el.closest('section');
      const h2 = section && section.querySelector('h2');
      return h2 ? `${s} (in "${h2.textContent.trim()}")` : s;
    };
    const out = [];
    for (const el of document.body.querySelectorAll('*')) {
      const r = el.getBoundingClientRect();
      if (r.width === 0 || r.right <= vw + 1 || scrolls(el)) continue;
      const parent = el.parentElement;
      if (parent && parent !== document.body && parent.getBoundingClientRect().right > vw + 1 && !scrolls(parent)) continue;
      out.push({ el: describe(el), right: Math.round(r.right), table: el.tagName === 'TABLE' || !!el.closest('table') });
    }
    return { overflows: doc > vw, scrollWidth: doc, innerWidth: vw, offenders: out };
  });
}

async function checkPhone(p, path) {
  await p.goto(path);
  await expectBanner(p);
  const o = await overflow(p);
  if (!o.overflows) return o;
  const list = o.offenders.map((x) => `${x.el} → right edge ${x.right}px`).join('; ');
  const msg = `${path} at ${PHONE.width}×${PHONE.height}: document is ${o.scrollWidth}px wide for a ${o.innerWidth}px viewport; sticking out: ${list || '(none found)'}`;
  if (o.offenders.length > 0 && o.offenders.every((x) => x.table)) {
    notes.push(`${msg} (only tables: reported, not failed)`);
  } else {
    assert.fail(msg);
  }
  return o;
}

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  server = await startServer();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  ctx = await newContext('desktop');
  page = await ctx.newPage();
}, { timeout: 180_000 });

after(async () => {
  try {
    if (browser) await browser.close();
  } finally {
    if (server) await server.stop();
  }
  if (warnings.length) console.log(`console warnings (not failures):\n  ${warnings.join('\n  ')}`);
  if (notes.length) console.log(`notes (not failures):\n  ${notes.join('\n  ')}`);
});

const canaryConsole = (x) => x.startsWith('[canary] console.error')
  && /inline style/i.test(x) && /Content Security Policy/.test(x);

test('self-check: the watcher sees a CSP violation (an injected inline style)', async () => {
  const c = await newContext('canary');
  try {
    const p = await c.newPage();
    await p.goto('/login');
    await p.evaluate(() => document.head.insertAdjacentHTML('beforeend', '<style>body { outline: 0 }</style>'));
    const recorded = await until(() => p.evaluate(() => window.__csp.length > 0 && window.__csp), { what: 'window.__csp' });
    assert.equal(recorded[0].effectiveDirective, 'style-src-elem');
    await until(() => problems.some((x) => x.startsWith('[canary] CSP violation')), { what: 'the reported violation' });
    await until(() => problems.some(canaryConsole), { what: "the browser's console error for it" });
  } finally {
    await c.close();
    // Expected, so not counted: drop exactly what the injected style caused (anything
    // else this page logged, e.g. a failed load, still counts).
    const caused = (x) => x.startsWith('[canary] CSP violation') || canaryConsole(x);
    for (let i = problems.length - 1; i >= 0; i--) if (caused(problems[i])) problems.splice(i, 1);
  }
});

test('keyboard: Tab from the top of the sign-in page reaches username, password, Sign in', { timeout: 60_000 }, async () => {
  const c = await newContext('keyboard');
  try {
    const p = await c.newPage();
    await p.goto('/login');
    await expectBanner(p);
    // Start from the top of the document: click the (non-focusable) PHI banner, which
    // moves the sequential focus navigation starting point there, and drop the autofocus.
    await p.locator('.phi-banner').click({ position: { x: 2, y: 2 } });
    await p.evaluate(() => document.activeElement && document.activeElement.blur && document.activeElement.blur());
    const seen = [];
    for (let i = 0; i < 3; i++) {
      await p.keyboard.press('Tab');
      seen.push(await p.evaluate(() => {
        const e = document.activeElement;
        if (!e || e === document.body) return 'body';
        return `${e.tagName.toLowerCase()}${e.getAttribute('name') ? `[name=${e.getAttribute('name')}]` : ''}`
          + `${e.getAttribute('type') ? `[type=${e.getAttribute('type')}]` : ''}:${(e.textContent || '').trim()}`;
      }));
    }
    assert.deepEqual(seen, ['input[name=username]:', 'input[name=password][type=password]:', 'button[type=submit]:Sign in'],
      `focus order from the top of /login: ${seen.join(' → ')}`);
  } finally {
    await c.close();
  }
});

test('sign in as admin through the form', async () => {
  await page.goto('/login');
  await expectBanner(page);
  assert.equal(await page.getByRole('heading', { name: 'Sign in' }).count(), 1);
  await shot(page, 'login.png');
  await page.locator('input[name=username]').fill(ADMIN.username);
  await page.locator('input[name=password]').fill(ADMIN.password);
  await Promise.all([
    page.waitForURL((u) => u.pathname === '/admin'),
    page.getByRole('button', { name: 'Sign in', exact: true }).click(),
  ]);
  await expectBanner(page);
  assert.equal(await fact(page, 'Username'), ADMIN.username);
  assert.equal(await fact(page, 'Role'), 'admin');
  const nav = page.getByRole('navigation', { name: 'Main' });
  for (const name of ['Dashboard', 'Users', 'Roles', 'Audit log']) {
    assert.equal(await nav.getByRole('link', { name, exact: true }).count(), 1, `nav link ${name}`);
  }
  assert.equal(await page.getByRole('button', { name: 'Sign out', exact: true }).count(), 1);
  assert.equal(await page.getByRole('button', { name: 'Set up an authenticator app' }).count(), 1);
  assert.equal(await page.getByRole('button', { name: 'Sign out everywhere' }).count(), 1);
  assert.equal(await page.locator('body').getAttribute('data-idle-seconds'), '300');
});

test('create a user (nurse.joy, nurse) from the users page', async () => {
  await page.goto('/admin/users');
  await expectBanner(page);
  const form = page.locator('#new-user form');
  await form.locator('input[name=username]').fill(NURSE.username);
  await form.locator('input[name=email]').fill(NURSE.email);
  await form.locator('select[name=role]').selectOption('nurse');
  await form.locator('input[name=password]').fill(NURSE.password);
  assert.equal(await form.locator('input[name=must_change_password]').isChecked(), true,
    'a typed password must be changed at the first sign-in, by default');
  await Promise.all([
    page.waitForURL((u) => /^\/admin\/users\/[^/]+$/.test(u.pathname)),
    form.getByRole('button', { name: 'Create' }).click(),
  ]);
  state.userPath = new URL(page.url()).pathname;
  await expectBanner(page);
  assert.equal((await page.locator('h1').innerText()).trim(), NURSE.username);
  assert.equal(await fact(page, 'Email'), `${NURSE.email} not verified`);
  assert.equal(await fact(page, 'Role'), 'nurse');

  await page.goto('/admin/users');
  const row = page.locator('table tbody tr', { hasText: NURSE.username });
  assert.equal(await row.count(), 1, 'the new user is listed');
  assert.match(await row.innerText(), /nurse/);
  await shot(page, 'users.png');
});

test("change the user's role to doctor on the user page", async () => {
  assert.ok(state.userPath, 'needs the user created by the previous test');
  await page.goto(state.userPath);
  const form = page.locator(`form[action$="/role"]`);
  await form.locator('select[name=role]').selectOption('doctor');
  await Promise.all([
    page.waitForLoadState('load'),
    page.waitForResponse((r) => r.request().method() === 'POST' && r.url().endsWith('/role')),
    form.getByRole('button', { name: 'Change role' }).click(),
  ]);
  await page.waitForURL((u) => u.pathname === state.userPath);
  await expectBanner(page);
  assert.equal(await fact(page, 'Role'), 'doctor');
  assert.equal(await page.locator(`form[action$="/role"] select[name=role]`).inputValue(), 'doctor');
  assert.equal(await page.locator('.error').count(), 0, 'no error shown');
  for (const name of ['Change role', 'Deactivate', 'Reset password', 'End all sessions', 'Change email']) {
    assert.equal(await page.getByRole('button', { name, exact: true }).count(), 1, `button ${name}`);
  }
  assert.equal(await page.getByRole('heading', { name: 'Sign-in history' }).count(), 1);
  assert.equal(await page.getByRole('heading', { name: 'Sessions and API tokens' }).count(), 1);
  assert.match(await fact(page, 'Password changed'), /must be changed at the next sign-in/);
  assert.equal(await page.locator('form[action$="/password"] input[name=must_change_password]').isChecked(), true);
  await shot(page, 'user.png');
});

test('create an API token on the dashboard, then rotate it', async () => {
  await page.goto('/admin');
  const tokens = page.locator('#tokens');
  await tokens.locator('input[name=name]').fill(TOKEN_NAME);
  await tokens.locator('input[name=days]').fill('7');
  await Promise.all([
    page.waitForResponse((r) => r.request().method() === 'POST' && new URL(r.url()).pathname === '/admin/tokens'),
    tokens.getByRole('button', { name: 'Create token' }).click(),
  ]);
  await page.waitForLoadState('load');
  const first = await page.locator('#new-token').inputValue();
  assert.match(first, /^cat_\S+$/, 'a cat_… secret is shown');
  assert.equal(await page.locator('#new-token').getAttribute('readonly'), '', '#new-token is read-only');
  assert.equal(await page.getByRole('button', { name: 'Copy' }).count(), 1);
  const row = page.locator('#tokens table tbody tr', { hasText: TOKEN_NAME });
  assert.equal(await row.count(), 1, 'the token is listed');
  assert.equal(await row.getByRole('button', { name: 'Rotate' }).count(), 1);
  assert.equal(await row.getByRole('button', { name: 'Revoke' }).count(), 1);
  await expectBanner(page);
  await shot(page, 'dashboard.png');

  await Promise.all([
    page.waitForResponse((r) => r.request().method() === 'POST' && r.url().endsWith('/rotate')),
    row.getByRole('button', { name: 'Rotate' }).click(),
  ]);
  await page.waitForLoadState('load');
  const second = await page.locator('#new-token').inputValue();
  assert.match(second, /^cat_\S+$/, 'a new cat_… secret is shown after Rotate');
  assert.notEqual(second, first, 'the rotated secret differs');
  assert.equal(await page.locator('#tokens .error').count(), 0, 'no token error shown');
  state.token = second;
});

test('audit log filtered by action "update" shows the user and api_token updates', async () => {
  await page.goto('/admin/audit');
  await expectBanner(page);
  const headers = (await page.locator('table.audit thead th').allInnerTexts()).map((s) => s.trim());
  assert.deepEqual(headers, ['#', 'When', 'Actor', 'Action', 'Resource', 'Patient', 'Request', 'Status', 'Address']);
  const seqs = (await page.locator('table.audit tbody tr td:first-child').allInnerTexts()).map(Number);
  assert.ok(seqs.length > 1, 'events are listed');
  assert.deepEqual(seqs, [...seqs].sort((a, b) => b - a), 'newest first');
  await shot(page, 'audit.png');

  // Audit records may be written in the background: reload a few times if needed.
  const rows = await until(async () => {
    await page.locator('select[name=action]').selectOption('update');
    await Promise.all([
      page.waitForURL((u) => u.pathname === '/admin/audit' && u.searchParams.get('action') === 'update'),
      page.getByRole('button', { name: 'Filter' }).click(),
    ]);
    const r = await page.locator('table.audit tbody tr').evaluateAll((trs) => trs.map((tr) => [...tr.cells].map((c) => c.textContent.trim())));
    const user = r.some((c) => /^user \S+/.test(c[4]));
    const token = r.some((c) => /^api_token \S+/.test(c[4]));
    return user && token ? r : null;
  }, { what: 'an update row for "user …" and one for "api_token …"' });
  for (const cells of rows) assert.equal(cells[3], 'update', `only update events: ${cells.join(' | ')}`);
  assert.equal(await page.locator('select[name=action]').inputValue(), 'update', 'the filter stays selected');
  const csv = page.getByRole('link', { name: 'Export CSV' });
  const href = await csv.getAttribute('href');
  assert.match(href, /action=update/, 'Export CSV keeps the filter');
  const res = await page.request.get(href);
  assert.equal(res.status(), 200, 'Export CSV answers 200');
  assert.match(res.headers()['content-type'] || '', /csv/);
});

test('roles page: matrix with built-in roles and Save buttons', async () => {
  await page.goto('/admin/roles');
  await expectBanner(page);
  const rows = page.locator('table.matrix tbody tr');
  assert.ok((await rows.count()) >= 2, 'roles are listed');
  assert.ok((await page.locator('table.matrix .tag', { hasText: 'built-in' }).count()) >= 1, 'built-in roles tagged');
  // Every role but `patient` (which never holds a permission) has its Save button.
  assert.equal(await page.locator('table.matrix tbody tr').filter({ has: page.getByRole('button', { name: 'Save' }) }).count(), await rows.count() - 1,
    'each editable row has a Save button');
  assert.ok((await page.locator('table.matrix tbody tr', { hasText: 'no permission, ever' }).count()) === 1, 'the patient role is fixed');
  assert.ok((await page.locator('table.matrix input[type=checkbox]').count()) > 0, 'permission checkboxes');
  assert.equal(await page.getByRole('heading', { name: 'New role' }).count(), 1);
  await shot(page, 'roles.png');
});

test('idle warning appears a minute before the timeout; "Stay signed in" keeps the session', { timeout: 60_000 }, async () => {
  // The fake clock belongs to a whole context: use a second one with the same session.
  const c = await newContext('idle', { storageState: await ctx.storageState() });
  try {
    const p = await c.newPage();
    await p.clock.install();
    await p.goto('/admin');
    assert.equal(await p.locator('body').getAttribute('data-idle-seconds'), '300');
    const warning = p.locator('#idle-warning');
    assert.equal(await warning.isHidden(), true, 'hidden at first');
    await p.clock.runFor('03:50');
    assert.equal(await warning.isHidden(), true, 'still hidden 70 s before the timeout');
    await p.clock.runFor('00:11');
    await warning.waitFor({ state: 'visible', timeout: 5000 });
    const left = Number(await p.locator('#idle-seconds').innerText());
    assert.ok(left > 0 && left <= 60, `countdown shows ${left} seconds`);
    const [res] = await Promise.all([
      p.waitForResponse((r) => new URL(r.url()).pathname === '/admin/keepalive'),
      p.getByRole('button', { name: 'Stay signed in' }).click(),
    ]);
    assert.equal(res.request().method(), 'POST');
    assert.equal(res.status(), 204, 'keepalive answers 204');
    await warning.waitFor({ state: 'hidden', timeout: 5000 });
    await p.clock.runFor('00:05');
    assert.equal(await warning.isHidden(), true, 'stays hidden after the restart');
    assert.equal(new URL(p.url()).pathname, '/admin', 'still on the dashboard');
  } finally {
    await c.close();
  }
});

test('phone (390×844): dashboard, users and sessions pages do not overflow sideways', { timeout: 60_000 }, async () => {
  const c = await newContext('phone', { viewport: PHONE, storageState: await ctx.storageState() });
  try {
    const p = await c.newPage();
    await checkPhone(p, '/admin');
    await shot(p, 'dashboard-phone.png');
    await checkPhone(p, '/admin/users');
    await checkPhone(p, '/admin/sessions');
    await shot(p, 'sessions-phone.png');
  } finally {
    await c.close();
  }
});

test('security events page: its heading, table and the link to it', async () => {
  await page.goto('/admin');
  await page.getByRole('link', { name: 'Security events' }).click();
  await page.waitForURL((u) => u.pathname === '/admin/security');
  await page.getByRole('heading', { name: 'Security events' }).waitFor();
  assert.ok(await page.getByRole('columnheader', { name: 'Rule' }).isVisible());
});

/** Whether the page's `.scroll` table containers and the document fit the viewport width. */
async function fitsWidth(p) {
  return p.evaluate(() => {
    const tooWide = [...document.querySelectorAll('.scroll')]
      .filter((el) => el.scrollWidth > el.clientWidth + 1)
      .map((el) => `${el.firstElementChild && el.firstElementChild.className}: ${el.scrollWidth} > ${el.clientWidth}`);
    const doc = document.documentElement.scrollWidth > window.innerWidth + 1;
    return { ok: tooWide.length === 0 && !doc, tooWide, doc: document.documentElement.scrollWidth };
  });
}

test('sessions page: every user\'s sessions and API tokens, filtered; a token revoked', async () => {
  await page.goto('/admin');
  await Promise.all([
    page.waitForURL((u) => u.pathname === '/admin/sessions'),
    page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Sessions', exact: true }).click(),
  ]);
  await expectBanner(page);
  await page.getByRole('heading', { name: 'Sessions and API tokens' }).waitFor();
  const headers = (await page.locator('table.credentials thead th').allInnerTexts()).map((x) => x.trim());
  assert.deepEqual(headers, ['User', 'Kind', 'Browser or name', 'Address', 'Started', 'Last used', 'Ends', '']);
  const mine = page.locator('table.credentials tbody tr', { hasText: 'this one' });
  assert.equal(await mine.count(), 1, 'the current session is marked');
  const token = page.locator('table.credentials tbody tr', { hasText: TOKEN_NAME });
  assert.equal(await token.count(), 1, 'the API token is listed');
  assert.equal((await page.content()).includes('cat_'), false, 'no secret on the page');
  const fit = await fitsWidth(page);
  assert.ok(fit.ok, `fits 1280 px: ${JSON.stringify(fit)}`);
  await shot(page, 'sessions.png');

  await page.locator('select[name=kind]').selectOption('api_token');
  await page.locator('input[name=user]').fill(ADMIN.username);
  await Promise.all([
    page.waitForURL((u) => u.pathname === '/admin/sessions' && u.searchParams.get('kind') === 'api_token'),
    page.getByRole('button', { name: 'Filter' }).click(),
  ]);
  assert.equal(await page.locator('table.credentials tbody tr', { hasText: 'this one' }).count(), 0, 'sessions filtered out');
  const row = page.locator('table.credentials tbody tr', { hasText: TOKEN_NAME });
  assert.equal(await row.count(), 1);
  await Promise.all([
    page.waitForURL((u) => u.pathname === '/admin/sessions' && u.searchParams.get('ok') === 'revoked'),
    row.getByRole('button', { name: 'Revoke', exact: true }).click(),
  ]);
  await expectBanner(page);
  assert.equal(await page.locator('.notice').innerText(), 'Revoked.');
  assert.equal(await page.locator('table.credentials tbody tr', { hasText: TOKEN_NAME }).count(), 0, 'the token is gone');
  assert.equal(await page.locator('select[name=kind]').inputValue(), 'api_token', 'the filter stays');
  const res = await page.request.get('/api/v1/auth/me', { headers: { authorization: `Bearer ${state.token}` } });
  assert.equal(res.status(), 401, 'the revoked token stops at once');
});

test('audit log is readable at 1280 px, usernames beside ids', async () => {
  await page.goto('/admin/audit?action=update');
  await expectBanner(page);
  const fit = await fitsWidth(page);
  assert.ok(fit.ok, `the audit table fits 1280 px: ${JSON.stringify(fit)}`);
  const named = page.locator('table.audit tbody td strong', { hasText: NURSE.username });
  assert.ok((await named.count()) >= 1, 'the user is named beside the id');
  const id = page.locator('table.audit tbody a.id').first();
  assert.match(await id.getAttribute('title'), /^[0-9a-f-]{36}$/, 'a shortened id carries the whole one');
  for (const name of ['Outcome', 'Status']) {
    assert.equal(await page.getByLabel(name).count(), 1, `filter ${name}`);
  }
});

test('security events: filters and CSV export', async () => {
  // Three failed sign-ins for one (unknown) account raise a warning.
  for (let i = 0; i < 3; i++) {
    const r = await page.request.post('/api/v1/auth/login', { data: { username: 'mallory.target', password: 'Wrong-Pass-1!' } });
    assert.equal(r.status(), 401);
  }
  await until(async () => {
    await page.goto('/admin/security');
    return (await page.locator('table.security tbody tr', { hasText: 'failed_logins_account' }).count()) > 0;
  }, { what: 'the failed_logins_account event' });
  await expectBanner(page);
  await shot(page, 'security.png');
  await page.locator('select[name=severity]').selectOption('high');
  await Promise.all([
    page.waitForURL((u) => u.pathname === '/admin/security' && u.searchParams.get('severity') === 'high'),
    page.getByRole('button', { name: 'Filter' }).click(),
  ]);
  assert.equal(await page.locator('select[name=severity]').inputValue(), 'high', 'the filter stays');
  assert.equal(await page.locator('table.security tbody tr', { hasText: 'failed_logins_account' }).count(), 0, 'a warning is filtered out');
  await page.locator('select[name=severity]').selectOption('warning');
  await Promise.all([
    page.waitForURL((u) => u.searchParams.get('severity') === 'warning'),
    page.getByRole('button', { name: 'Filter' }).click(),
  ]);
  assert.equal(await page.locator('table.security tbody tr', { hasText: 'failed_logins_account' }).count(), 1);
  const href = await page.getByRole('link', { name: 'Export CSV' }).getAttribute('href');
  assert.match(href, /severity=warning/, 'the export keeps the filter');
  const res = await page.request.get(href);
  assert.equal(res.status(), 200);
  assert.match(res.headers()['content-type'] || '', /csv/);
  const lines = (await res.text()).trim().split('\n');
  assert.equal(lines[0], 'id,at,rule,severity,subject,detail');
  assert.ok(lines.slice(1).length >= 1 && lines.slice(1).every((l) => l.includes(',warning,')), lines.join('\n'));
});

test('roles page: what each permission allows', async () => {
  await page.goto('/admin/roles');
  const rows = page.locator('#permissions table tbody tr');
  assert.equal(await rows.count(), 10, 'every permission is described');
  const ssn = rows.filter({ has: page.locator('th code', { hasText: /^phi:ssn$/ }) });
  assert.match(await ssn.innerText(), /Social Security numbers/);
  assert.match(await page.locator('table.matrix thead th[title]').first().getAttribute('title'), /\./);
});

test('no console errors, page errors or CSP violations on any page', async () => {
  // The binding reports violations as they happen; as a backstop, also read window.__csp
  // of the page still open.
  const csp = await page.evaluate(() => window.__csp || []).catch(() => []);
  if (csp.length && !problems.some((x) => x.startsWith('[desktop] CSP violation'))) {
    problems.push(`[desktop] window.__csp on ${page.url()}: ${JSON.stringify(csp)}`);
  }
  if (problems.length) assert.fail(`${problems.length} problem(s):\n  ${problems.join('\n  ')}`);
});
