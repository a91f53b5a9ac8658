// Browser tests of the clinician workspace (issue 22): the patient list and its search,
// the chart, the audited SSN reveal, the de-identified view, records added and edited
// (a concurrent edit is shown, not overwritten), break-glass from the chart, and the
// idle-timeout warning — as a nurse, a doctor, an auditor, an admin and a user without
// patients:read. Every console error, page error and CSP violation on any page fails
// the run (the last test).
//
//   cd tests/browser && npm ci && node --test clinic.test.mjs     (or: bash tests/browser/run.sh)
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { ADMIN, startServer } from './server.mjs';
import { signIn } from './watch.mjs';
import {
  CHROMIUM, CHROMIUM_ARGS, PHONE, SHOTS, api, cli, kit, newContext, shot, token,
} from './kit.mjs';

const PW = 'Clinic-Pass-12345!';
const IDLE_SECONDS = 300;

let server;
let browser;
const problems = [];
const warnings = [];
const people = {}; // role → { username, password }
let target; // a seeded patient: { id, given_name, family_name, mrn, birth_date, ssn }
let other; // another seeded patient







before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  // Rate limits off: the five roles sign in more often than POST /login allows one
  // address (10/m); the limits have tests of their own.
  server = await startServer({ env: { CUSTODIAN_SESSION__IDLE_TIMEOUT: `${IDLE_SECONDS}s`, CUSTODIAN_RATE_LIMIT__ENABLED: 'false' } });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  Object.assign(kit, { server, browser, problems, warnings });
  people.admin = { username: ADMIN.username, password: ADMIN.password };
  for (const role of ['doctor', 'nurse', 'auditor']) {
    people[role] = { username: `${role}.one`, password: PW };
    cli(['user', 'create', '--username', people[role].username, '--role', role, '--password-stdin'], `${PW}\n`);
  }
  // A role without patients:read that may break the glass.
  const admin = await token(people.admin);
  const role = await api('POST', '/api/v1/roles', admin, { name: 'responder', permissions: ['breakglass'] });
  assert.equal(role.status, 201, JSON.stringify(role.body));
  people.responder = { username: 'responder.one', password: PW };
  cli(['user', 'create', '--username', people.responder.username, '--role', 'responder', '--password-stdin'], `${PW}\n`);
  cli(['demo', 'seed', '--patients', '40']);
  // Two patients with labs (the seed leaves every fifth without) and an SSN.
  const doctor = await token(people.doctor);
  const list = await api('GET', '/api/v1/patients?limit=40', doctor);
  const withLabs = [];
  for (const p of list.body.items) {
    const labs = await api('GET', `/fhir/Observation?patient=${p.id}&_count=1`, doctor);
    if (labs.body.total > 0 && p.ssn) withLabs.push(p);
    if (withLabs.length === 2) break;
  }
  [target, other] = withLabs;
  assert.ok(target && other, 'two seeded patients with labs');
  // A namesake, so that the first three letters of the family name find more than one
  // patient whatever names the seed drew.
  const namesake = await api('POST', '/api/v1/patients', doctor, {
    given_name: 'Namesake',
    family_name: `${target.family_name.slice(0, 3)}zyx`,
    birth_date: '1950-01-02',
    sex: 'female',
  });
  assert.equal(namesake.status, 201, JSON.stringify(namesake.body));
}, { timeout: 600_000 });

after(async () => {
  try {
    if (browser) await browser.close();
  } finally {
    if (server) await server.stop();
  }
  if (warnings.length) console.log(`console warnings (not failures):\n  ${warnings.join('\n  ')}`);
});

test('each role starts where its work is; the patient list only for patients:read', { timeout: 120_000 }, async () => {
  const expected = { doctor: '/patients', nurse: '/patients', admin: '/admin', auditor: '/admin', responder: '/admin' };
  for (const [role, start] of Object.entries(expected)) {
    const c = await newContext(role);
    try {
      const p = await signIn(c, people[role]);
      assert.equal(new URL(p.url()).pathname, start, `${role} lands on ${start}`);
      const nav = p.getByRole('navigation', { name: 'Main' });
      const canRead = role !== 'auditor' && role !== 'responder';
      assert.equal(await nav.getByRole('link', { name: 'Patients' }).count(), canRead ? 1 : 0, `${role}: Patients in the menu`);
      const res = await p.goto('/patients?q=a');
      assert.equal(res.status(), canRead ? 200 : 403, `${role}: /patients`);
      if (!canRead) assert.match(await p.locator('main').innerText(), /Not allowed/);
    } finally {
      await c.close();
    }
  }
});

test('the search box finds people as they are typed', { timeout: 120_000 }, async () => {
  const c = await newContext('doctor-search');
  try {
    const p = await signIn(c, people.doctor);
    const [y, m, d] = target.birth_date.split('-');
    const queries = [
      `${target.given_name} ${target.family_name}`,
      `${target.family_name} ${target.given_name}`,
      `${target.family_name}, ${target.given_name}`,
      `${target.family_name.slice(0, 3)} ${target.given_name.slice(0, 3)}`,
      target.mrn,
      `${m}/${d}/${y}`,
      `${target.family_name} ${y}-${m}-${d}`,
    ];
    for (const q of queries) {
      await p.locator('input[name=q]').fill(q);
      await Promise.all([p.waitForURL((u) => u.searchParams.get('q') === q), p.getByRole('button', { name: 'Search' }).click()]);
      const link = p.locator(`table.patients a[href="/patients/${target.id}"]`);
      assert.equal(await link.count(), 1, `"${q}" finds the patient`);
    }
    // A prefix: several patients, by relevance then name.
    await p.goto(`/patients?q=${encodeURIComponent(target.family_name.slice(0, 3))}`);
    assert.ok(await p.locator('table.patients tbody tr').count() > 1);
    await shot(p, 'patients.png');
    // Two letters match whole names only, and the page says so.
    await p.goto('/patients?q=Zq');
    assert.match(await p.locator('main').innerText(), /at least 3 letters/);
    // An SSN without phi:ssn is refused (the doctor holds it: found).
    await p.goto(`/patients?q=${encodeURIComponent(target.ssn)}`);
    assert.equal(await p.locator(`table.patients a[href="/patients/${target.id}"]`).count(), 1);
    const phone = await newContext('doctor-search-phone', { viewport: PHONE, isMobile: true, hasTouch: true });
    try {
      const pp = await phone.newPage();
      await c.storageState().then((s) => phone.addCookies(s.cookies));
      await pp.goto(`/patients?q=${encodeURIComponent(target.family_name)}`);
      await shot(pp, 'patients-phone.png');
    } finally {
      await phone.close();
    }
  } finally {
    await c.close();
  }
});

test('the chart: coded data, the audited SSN reveal, the de-identified view, a record added', { timeout: 120_000 }, async () => {
  const c = await newContext('doctor-chart');
  try {
    const p = await signIn(c, people.doctor);
    await p.goto(`/patients/${target.id}`);
    const main = p.locator('main');
    assert.match(await p.locator('h1').innerText(), new RegExp(target.family_name));
    assert.ok(await p.locator('#labs tbody tr').count() > 0, 'recent labs');
    assert.match(await p.locator('#labs').innerText(), /g\/dL|mg\/dL|10\*3\/uL/, 'with units');
    // The SSN is masked until the audited click.
    const ssn = p.locator('#ssn');
    assert.match(await ssn.innerText(), /^XXX-XX-\d{4}$/);
    await Promise.all([p.waitForURL((u) => u.pathname.endsWith('/ssn')), p.locator('#reveal-ssn').click()]);
    assert.equal(await p.locator('#ssn').innerText(), target.ssn);
    const auditor = await token(people.auditor);
    const events = await api('GET', `/api/v1/audit/events?patient_id=${target.id}&limit=50`, auditor);
    assert.ok(events.body.items.some((e) => e.path === '/patients/{id}/ssn' && e.context && e.context.field === 'ssn'),
      'the reveal is its own audit event');
    await p.goto(`/patients/${target.id}`);
    await shot(p, 'chart.png');
    // De-identified: no name, MRN or SSN, years only.
    await p.getByRole('link', { name: 'De-identified view' }).click();
    await p.waitForURL((u) => u.searchParams.get('view') === 'deidentified');
    const text = await main.innerText();
    for (const leak of [target.family_name, target.given_name, target.mrn, target.ssn.slice(-4), target.birth_date]) {
      assert.ok(!text.includes(leak), `${leak} in the de-identified chart`);
    }
    assert.match(text, /REDACTED/);
    assert.equal(await p.locator('#disclosures').count(), 0);
    // A record added from the chart.
    await p.goto(`/patients/${target.id}`);
    await p.locator('#records summary').click();
    await p.locator('#records input[name=diagnosis]').fill('Chest pain, observed');
    await p.locator('#records input[name=treatment]').fill('Aspirin');
    await Promise.all([p.waitForURL((u) => u.pathname === `/patients/${target.id}`), p.getByRole('button', { name: 'Add record' }).click()]);
    assert.match(await p.locator('#records').innerText(), /Chest pain, observed/);
    const phone = await newContext('doctor-chart-phone', { viewport: PHONE, isMobile: true, hasTouch: true });
    try {
      await c.storageState().then((s) => phone.addCookies(s.cookies));
      const pp = await phone.newPage();
      await pp.goto(`/patients/${target.id}`);
      await shot(pp, 'chart-phone.png');
    } finally {
      await phone.close();
    }
  } finally {
    await c.close();
  }
});

test('a concurrent edit is shown, not overwritten', { timeout: 60_000 }, async () => {
  const c = await newContext('doctor-edit');
  try {
    const p = await signIn(c, people.doctor);
    await p.goto(`/patients/${target.id}`);
    const href = await p.locator('#records a', { hasText: 'Edit' }).first().getAttribute('href');
    const first = p;
    const second = await c.newPage();
    await first.goto(href);
    await second.goto(href);
    await first.locator('input[name=diagnosis]').fill('Saved first');
    await Promise.all([first.waitForURL((u) => u.pathname === `/patients/${target.id}`), first.getByRole('button', { name: 'Save' }).click()]);
    await second.locator('input[name=diagnosis]').fill('Saved second');
    const [res] = await Promise.all([
      second.waitForResponse((r) => r.request().method() === 'POST'),
      second.getByRole('button', { name: 'Save' }).click(),
    ]);
    assert.equal(res.status(), 409);
    const conflict = second.locator('#conflict');
    assert.match(await conflict.innerText(), /Someone else saved this record/);
    assert.match(await conflict.innerText(), /Saved first/);
    assert.equal(await second.locator('input[name=diagnosis]').inputValue(), 'Saved second', 'what was typed is kept');
    await shot(second, 'record-conflict.png');
    // Saving again, knowingly, replaces it.
    await Promise.all([second.waitForURL((u) => u.pathname === `/patients/${target.id}`), second.getByRole('button', { name: 'Save' }).click()]);
    assert.match(await second.locator('#records').innerText(), /Saved second/);
  } finally {
    await c.close();
  }
});

test('a nurse reads the chart but writes nothing and sees SSNs masked', { timeout: 60_000 }, async () => {
  const c = await newContext('nurse');
  try {
    const p = await signIn(c, people.nurse);
    await p.goto(`/patients?q=${encodeURIComponent(target.family_name)}`);
    await p.goto(`/patients/${target.id}`);
    assert.match(await p.locator('#ssn').innerText(), /^XXX-XX-\d{4}$/);
    assert.equal(await p.locator('#reveal-ssn').count(), 0);
    assert.equal(await p.locator('#records summary').count(), 0, 'no add form');
    assert.equal(await p.locator('#records a', { hasText: 'Edit' }).count(), 0);
    assert.equal(await p.locator('#disclosures').count(), 0, 'no accounting without audit:read');
    assert.ok(await p.locator('#labs tbody tr').count() > 0);
    const res = await p.request.post(`/patients/${target.id}/ssn`, { form: { csrf: await p.locator('body').getAttribute('data-csrf') } });
    assert.equal(res.status(), 403);
  } finally {
    await c.close();
  }
});

test('an admin sees the accounting of disclosures on the chart', { timeout: 60_000 }, async () => {
  const c = await newContext('admin');
  try {
    const p = await signIn(c, people.admin);
    await p.goto(`/patients/${target.id}`);
    const acc = p.locator('#disclosures');
    assert.equal(await acc.count(), 1);
    assert.match(await acc.innerText(), new RegExp(people.doctor.username));
    assert.match(await acc.innerText(), new RegExp(people.nurse.username));
  } finally {
    await c.close();
  }
});

test('an auditor reads no chart', { timeout: 60_000 }, async () => {
  const c = await newContext('auditor');
  try {
    const p = await signIn(c, people.auditor);
    const res = await p.goto(`/patients/${target.id}`);
    assert.equal(res.status(), 403);
    const text = await p.locator('main').innerText();
    assert.ok(!text.includes(target.family_name));
    assert.equal(await p.locator('textarea[name=reason]').count(), 0, 'no break-glass without breakglass');
  } finally {
    await c.close();
  }
});

test('break-glass opens that one patient, with a banner, never the list', { timeout: 90_000 }, async () => {
  const c = await newContext('responder');
  try {
    const p = await signIn(c, people.responder);
    let res = await p.goto(`/patients/${target.id}`);
    assert.equal(res.status(), 403);
    assert.ok(!(await p.locator('main').innerText()).includes(target.family_name), 'nothing of the patient before');
    await shot(p, 'break-glass-form.png');
    // A reason too short is refused.
    await p.locator('textarea[name=reason]').fill('because');
    await p.locator('textarea[name=reason]').evaluate((e) => e.removeAttribute('minlength'));
    await p.getByRole('button', { name: 'Break the glass' }).click();
    assert.match(await p.locator('main').innerText(), /at least 10 characters/);
    await p.locator('textarea[name=reason]').fill('Unconscious in the emergency room, no relatives');
    await Promise.all([p.waitForURL((u) => u.pathname === `/patients/${target.id}`), p.getByRole('button', { name: 'Break the glass' }).click()]);
    const banner = p.locator('.banner.break-glass');
    assert.match(await banner.innerText(), /Emergency access/);
    assert.match(await p.locator('h1').innerText(), new RegExp(target.family_name));
    assert.ok(await p.locator('#labs tbody tr').count() > 0, 'the clinical data too');
    await shot(p, 'break-glass.png');
    // Never a list or a search; never another patient.
    res = await p.goto(`/patients?q=${encodeURIComponent(target.family_name)}`);
    assert.equal(res.status(), 403);
    res = await p.goto(`/patients/${other.id}`);
    assert.equal(res.status(), 403);
    assert.ok(!(await p.locator('main').innerText()).includes(other.family_name));
    // Flagged and raised.
    const auditor = await token(people.auditor);
    const events = await api('GET', `/api/v1/audit/events?patient_id=${target.id}&limit=100`, auditor);
    assert.ok(events.body.items.some((e) => e.break_glass && e.reason === 'Unconscious in the emergency room, no relatives'));
    // Ended now: locked again.
    await p.goto(`/patients/${target.id}`);
    await Promise.all([p.waitForURL((u) => u.pathname === '/patients'), p.getByRole('button', { name: 'End now' }).click()]);
    res = await p.goto(`/patients/${target.id}`);
    assert.equal(res.status(), 403);
  } finally {
    await c.close();
  }
});

test('the idle timeout is announced, and "Stay signed in" keeps the session', { timeout: 60_000 }, async () => {
  const c = await newContext('idle');
  try {
    const p = await signIn(c, people.nurse);
    await p.clock.install();
    await p.goto(`/patients/${target.id}`);
    const warning = p.locator('#idle-warning');
    assert.equal(await warning.isHidden(), true);
    await p.clock.fastForward((IDLE_SECONDS - 50) * 1000);
    await warning.waitFor({ state: 'visible' });
    assert.match(await warning.innerText(), /signed out in \d+ seconds/);
    await Promise.all([
      p.waitForResponse((r) => new URL(r.url()).pathname === '/admin/keepalive' && r.status() === 204),
      p.getByRole('button', { name: 'Stay signed in' }).click(),
    ]);
    await warning.waitFor({ state: 'hidden' });
  } finally {
    await c.close();
  }
});

test('no page had a console error, an uncaught error or a CSP violation', () => {
  assert.deepEqual(problems, []);
});
