// Browser test of Custodian as a SMART authorization server, the loop closed
// (docs/smart-server.md): a doctor opens a seeded patient's chart, launches the built-in
// PRECISE-HBR app (registered automatically in dev, client id `custodian`), consents on
// /oauth/authorize, and lands on /smart/app with the score computed from this server's
// own FHIR data; the grant is then listed on /account/apps. Every console error, page
// error and CSP violation on any page fails the run (the last test).
//
//   cd tests/browser && npm ci && node --test smart-server.test.mjs   (or: bash tests/browser/run.sh)
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { ADMIN, startServer } from './server.mjs';
import { signIn } from './watch.mjs';
import {
  CHROMIUM, CHROMIUM_ARGS, SHOTS, api, cli, kit, newContext, shot, token,
} from './kit.mjs';

// SCREENSHOTS=1 retakes the ones in docs/screenshots/ (as for the other browser tests).
const PW = 'Clinic-Pass-12345!';
const LAB = 'http://terminology.hl7.org/CodeSystem/observation-category';
// The hemoglobin stored for the patient just before the launch: the newest result, so
// the one the app must use.
const HEMOGLOBIN = 10.7;

let server;
let browser;
let doctorContext; // the doctor's browser, signed in; shared by the tests in order
const problems = [];
const warnings = [];
const doctor = { username: 'doctor.one', password: PW };
let target; // a seeded patient with labs: { id, given_name, family_name, ... }
let hemoglobinId; // the Observation stored for it







before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  // Rate limits off, as in clinic.test.mjs: the limits have tests of their own. The
  // server listens on 127.0.0.1:<port> (startServer), so the built-in app's FHIR base,
  // redirect URI and allowed issuer are http://127.0.0.1:<port>/… — the browser uses
  // that address too (server.baseURL), never localhost.
  server = await startServer({ env: { CUSTODIAN_RATE_LIMIT__ENABLED: 'false' } });
  assert.match(server.baseURL, /^http:\/\/127\.0\.0\.1:\d+$/);
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  Object.assign(kit, { server, browser, problems, warnings });
  cli(['user', 'create', '--username', doctor.username, '--role', 'doctor', '--password-stdin'], `${PW}\n`);
  cli(['demo', 'seed', '--patients', '20']);

  // The built-in app is registered (dev default), with this server's own callback.
  const admin = await token(ADMIN);
  const app = await api('GET', '/api/v1/apps/custodian', admin);
  assert.equal(app.status, 200, JSON.stringify(app.body));
  assert.equal(app.body.builtin, true);
  assert.ok(app.body.redirect_uris.includes(`${server.baseURL}/smart/callback`), JSON.stringify(app.body.redirect_uris));

  // A seeded patient with labs (the seed leaves every fifth without); for a score with
  // every input, preferably an adult whose sex is male or female (the seed draws sex and
  // birth date at random).
  const doc = await token(doctor);
  const list = await api('GET', '/api/v1/patients?limit=20', doc);
  assert.equal(list.status, 200, JSON.stringify(list.body));
  const adult = (p) => /^\d{4}/.test(p.birth_date || '') && Number(p.birth_date.slice(0, 4)) <= new Date().getFullYear() - 40;
  const withLabs = [];
  for (const p of list.body.items) {
    const labs = await api('GET', `/fhir/Observation?patient=${p.id}&_count=1`, doc);
    if (labs.body.total > 0) withLabs.push(p);
  }
  target = withLabs.find((p) => ['female', 'male'].includes(p.sex) && adult(p)) || withLabs[0];
  assert.ok(target, 'a seeded patient with labs');
  // And a hemoglobin result newer than every seeded one (a full timestamp, now).
  const obs = await api('POST', '/fhir/Observation', doc, {
    resourceType: 'Observation',
    status: 'final',
    category: [{ coding: [{ system: LAB, code: 'laboratory' }] }],
    code: { coding: [{ system: 'http://loinc.org', code: '718-7', display: 'Hemoglobin [Mass/volume] in Blood' }] },
    subject: { reference: `Patient/${target.id}` },
    effectiveDateTime: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
    valueQuantity: { value: HEMOGLOBIN, unit: 'g/dL', system: 'http://unitsofmeasure.org', code: 'g/dL' },
  }, 'application/fhir+json');
  assert.equal(obs.status, 201, JSON.stringify(obs.body));
  hemoglobinId = obs.body.id;
}, { timeout: 600_000 });

after(async () => {
  try {
    if (doctorContext) await doctorContext.close();
    if (browser) await browser.close();
  } finally {
    if (server) await server.stop();
  }
  if (warnings.length) console.log(`console warnings (not failures):\n  ${warnings.join('\n  ')}`);
});

test('a doctor launches the built-in PRECISE-HBR app from a chart: consent, then the score', { timeout: 120_000 }, async () => {
  doctorContext = await newContext('doctor');
  const p = await signIn(doctorContext, doctor);
  assert.equal(new URL(p.url()).pathname, '/patients');

  // The patient list: search by name, open the chart.
  const q = `${target.family_name} ${target.given_name}`;
  await p.locator('input[name=q]').fill(q);
  await Promise.all([p.waitForURL((u) => u.searchParams.get('q') === q), p.getByRole('button', { name: 'Search' }).click()]);
  const link = p.locator(`table.patients a[href="/patients/${target.id}"]`);
  assert.equal(await link.count(), 1, `"${q}" finds the patient`);
  await Promise.all([p.waitForURL((u) => u.pathname === `/patients/${target.id}`), link.click()]);
  assert.match(await p.locator('h1').innerText(), new RegExp(target.family_name));

  // The chart's Apps section: launch the built-in app.
  const apps = p.locator('#apps');
  assert.match(await apps.locator('h2').innerText(), /Apps/);
  const launch = apps.getByRole('button', { name: 'Launch PRECISE-HBR (built in)' });
  assert.equal(await launch.count(), 1);
  // /patients/{id}/launch → /smart/launch → /oauth/authorize: the consent page.
  await Promise.all([p.waitForURL((u) => u.pathname === '/oauth/authorize'), launch.click()]);
  const url = new URL(p.url());
  assert.equal(url.origin, server.baseURL, 'the authorization server is this server');
  assert.equal(url.searchParams.get('client_id'), 'custodian');
  assert.equal(url.searchParams.get('aud'), `${server.baseURL}/fhir`);
  assert.ok(url.searchParams.get('launch'), 'an EHR launch');
  assert.equal(url.searchParams.get('code_challenge_method'), 'S256');

  const consent = p.locator('section.consent');
  assert.equal(await p.locator('h1').innerText(), 'Allow PRECISE-HBR (built in) to use your access?');
  assert.match(await consent.innerText(), new RegExp(`Patient: ${target.given_name} ${target.family_name}|Patient: .*${target.family_name}`));
  const scopes = consent.locator('input[type=checkbox][name=scope]');
  assert.ok(await scopes.count() > 0, 'the scopes, as checkboxes');
  for (let i = 0; i < await scopes.count(); i += 1) {
    assert.equal(await scopes.nth(i).isChecked(), true, `scope ${await scopes.nth(i).getAttribute('value')} ticked`);
  }
  const values = await scopes.evaluateAll((els) => els.map((e) => e.value));
  assert.ok(values.some((v) => v.startsWith('patient/Observation')), `observations asked for: ${values.join(' ')}`);
  assert.equal(await consent.getByText('your role does not allow this').count(), 0, 'a doctor may use every scope asked');
  assert.equal(await consent.locator('#picker').count(), 0, 'an EHR launch names its patient: no picker');
  await shot(p, 'smart-consent.png');

  // Allow: /oauth/consent → /smart/callback (the code exchanged at this server) → /smart/app.
  await Promise.all([
    p.waitForURL((u) => u.pathname === '/smart/app', { timeout: 30_000 }),
    consent.getByRole('button', { name: 'Allow' }).click(),
  ]);
  assert.equal(new URL(p.url()).origin, server.baseURL);
  const header = p.locator('.patient-header');
  assert.match(await header.innerText(), new RegExp(target.family_name));
  assert.match(await header.innerText(), new RegExp(`${server.baseURL}/fhir`), 'read from this server');
  const score = p.locator('#score');
  await score.waitFor();
  assert.match(await score.innerText(), /^\d+$/);
  assert.ok((await p.locator('#category').innerText()).length > 0);
  // The hemoglobin stored above is the one used, from this server's Observation.
  const hbRow = p.locator('section.score tbody tr', { hasText: /hemoglobin/i });
  assert.equal(await hbRow.count(), 1, await p.locator('section.score').innerText());
  assert.match(await hbRow.innerText(), new RegExp(String(HEMOGLOBIN).replace('.', '\\.')));
  assert.match(await hbRow.innerText(), new RegExp(`Observation/${hemoglobinId}`));
  assert.equal(Number(await p.getByLabel('Hemoglobin (g/dL)').inputValue()), HEMOGLOBIN);
  await shot(p, 'smart-launch-score.png');
});

test('the grant is listed on the connected apps page', { timeout: 60_000 }, async () => {
  assert.ok(doctorContext, 'the launch ran');
  const p = await doctorContext.newPage();
  const res = await p.goto('/account/apps');
  assert.equal(res.status(), 200);
  const row = p.locator('table.grants tbody tr', { hasText: 'PRECISE-HBR' });
  assert.equal(await row.count(), 1, await p.locator('main').innerText());
  assert.equal(await row.locator(`a[href="/patients/${target.id}"]`).count(), 1, 'for that patient');
  assert.equal(await row.getByRole('button', { name: 'Disconnect' }).count(), 1);
  await p.close();
});

// An app on another site (another origin: localhost instead of 127.0.0.1) sends the
// signed-in doctor to /oauth/authorize: the SameSite=Strict session is picked up by one
// page of the server's own that moves on by itself (no second sign-in), and after
// "Allow" the browser reaches the app's origin (the consent page's form-action names
// it: browsers hold a redirect that follows a form post to an origin the policy omits).
test('an app on another site: no second sign-in, and the consent reaches the app', { timeout: 60_000 }, async () => {
  assert.ok(doctorContext, 'the launch ran');
  const appOrigin = server.baseURL.replace('127.0.0.1', 'localhost');
  const redirect = `${appOrigin}/health`;
  const admin = await token(ADMIN);
  const reg = await api('POST', '/api/v1/apps', admin, {
    name: 'Another site', redirect_uris: [redirect], scopes: 'launch/patient patient/Patient.rs',
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  const verifier = randomBytes(32).toString('hex');
  const challenge = createHash('sha256').update(verifier).digest('base64url');
  const q = new URLSearchParams({
    response_type: 'code', client_id: reg.body.client_id, redirect_uri: redirect,
    scope: 'launch/patient patient/Patient.rs', state: 'xyz', aud: `${server.baseURL}/fhir`,
    code_challenge: challenge, code_challenge_method: 'S256',
  });
  const p = await doctorContext.newPage();
  await p.goto(redirect);
  // The app's own page sends the browser over (a cross-site navigation).
  await Promise.all([
    p.waitForURL(/\/oauth\/authorize\?.*_same_site=1/),
    p.evaluate((u) => { window.location.href = u; }, `${server.baseURL}/oauth/authorize?${q}`),
  ]);
  await p.getByRole('heading', { name: /Allow Another site/ }).waitFor();
  await p.getByRole('searchbox').or(p.locator('input[name="picker_q"]')).first().fill(target.family_name);
  await Promise.all([p.waitForLoadState('load'), p.locator('#picker button[type="submit"]').click()]);
  await p.locator(`input[name="patient"][value="${target.id}"]`).check();
  await Promise.all([
    p.waitForURL((u) => u.href.startsWith(`${redirect}?`)),
    p.getByRole('button', { name: 'Allow' }).click(),
  ]);
  const back = new URL(p.url());
  assert.equal(back.searchParams.get('state'), 'xyz');
  const code = back.searchParams.get('code');
  assert.ok(code, p.url());
  const res = await fetch(`${server.baseURL}/oauth/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'authorization_code', code, redirect_uri: redirect,
      code_verifier: verifier, client_id: reg.body.client_id,
    }),
  });
  assert.equal(res.status, 200);
  assert.equal((await res.json()).patient, target.id);
  await p.close();
});

test('no page had a console error, an uncaught error or a CSP violation', () => {
  assert.deepEqual(problems, []);
});
