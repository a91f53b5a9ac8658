// Browser tests of the patient portal (issue 25): a patient invited from their record
// (the link read from the dev mail folder) opens their account, reads their record,
// prints it, downloads it, restricts a sensitive category, asks for a correction that a
// doctor denies and the patient answers, and reads who accessed their record — with a
// doctor's chart showing the patient's requests. Every console error, page error and
// CSP violation fails the run (the last test).
//
//   cd tests/browser && npm ci && node --test portal.test.mjs     (or: bash tests/browser/run.sh)
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { ADMIN, startServer } from './server.mjs';
import { signIn } from './watch.mjs';
import {
  CHROMIUM, CHROMIUM_ARGS, PHONE, SHOTS, api, cli, kit, newContext, shot, token,
} from './kit.mjs';

const PW = 'Portal-Pass-12345!';

let server;
let browser;
const problems = [];
const warnings = [];
const doctor = { username: 'doctor.one', password: PW };
const patient = { username: 'ada.patient', password: 'Ada-Own-Pass-2468!' };
let target; // the patient's record: { id, given_name, family_name }






/** The invitation link of the newest mail to `to` in the dev mail folder. */
async function inviteLink(to) {
  const dir = join(server.env.CUSTODIAN_DATA_DIR, 'mail');
  for (let i = 0; i < 100; i += 1) {
    let files = [];
    try { files = readdirSync(dir).sort(); } catch { /* not yet */ }
    for (const f of files.reverse()) {
      const text = readFileSync(join(dir, f), 'utf8');
      const link = text.match(/(\/accounts\/invite\/[0-9a-f]{64})/);
      if (text.includes(`To: <${to}>`) && link) return link[1];
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no invitation mail to ${to}`);
}

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  server = await startServer({ env: { CUSTODIAN_RATE_LIMIT__ENABLED: 'false' } });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  Object.assign(kit, { server, browser, problems, warnings });
  cli(['user', 'create', '--username', doctor.username, '--role', 'doctor', '--password-stdin'], `${PW}\n`);
  cli(['demo', 'seed', '--patients', '12']);
  // The clinic lets its doctors review amendment requests (the admin role's by default).
  const admin = await token(ADMIN);
  const role = await api('PUT', '/api/v1/roles/doctor', admin, {
    permissions: ['patients:read', 'patients:write', 'records:read', 'records:write', 'phi:ssn', 'amendments:review'],
  });
  assert.equal(role.status, 200, JSON.stringify(role.body));
  const doc = await token(doctor);
  const list = await api('GET', '/api/v1/patients?limit=12', doc);
  for (const p of list.body.items) {
    const labs = await api('GET', `/fhir/Observation?patient=${p.id}&_count=1`, doc);
    if (labs.body.total > 0) { target = p; break; }
  }
  assert.ok(target, 'a seeded patient with labs');
  // A behavioural-health note, labelled PSY.
  const rec = await api('POST', `/api/v1/patients/${target.id}/records`, doc, {
    diagnosis: 'Generalised anxiety disorder', treatment: 'Talking therapy', labels: ['PSY'],
  });
  assert.equal(rec.status, 201, JSON.stringify(rec.body));
  // The invitation goes to the address on the record, and only there.
  const email = await api('PATCH', `/api/v1/patients/${target.id}`, doc, { email: 'ada.patient@example.org' });
  assert.equal(email.status, 200, JSON.stringify(email.body));
  const inv = await api('POST', `/api/v1/patients/${target.id}/invitation`, doc);
  assert.equal(inv.status, 201, JSON.stringify(inv.body));
}, { timeout: 600_000 });

after(async () => {
  await browser?.close();
  await server?.stop();
});

test('the patient opens their account from the invitation and lands on their record', async () => {
  const c = await newContext('patient-invite');
  const p = await c.newPage();
  await p.goto(await inviteLink('ada.patient@example.org'));
  // The mailbox alone does not open a record: the birth date on the record is asked.
  await p.locator('input[name=birth_date]').fill(target.birth_date);
  await p.locator('input[name=username]').fill(patient.username);
  const pw = p.locator('input[type=password]');
  for (let i = 0; i < await pw.count(); i += 1) await pw.nth(i).fill(patient.password);
  await Promise.all([p.waitForLoadState('load'), p.locator('form button[type=submit]').first().click()]);
  await c.close();

  const ctx = await newContext('patient');
  const page = await signIn(ctx, patient);
  assert.equal(new URL(page.url()).pathname, '/my');
  await assert.doesNotReject(page.getByRole('heading', { name: 'My health record' }).waitFor());
  const html = await page.content();
  assert.ok(html.includes(target.family_name), 'their own name');
  assert.ok(html.includes('Generalised anxiety disorder'), 'their whole record, restricted parts included');
  assert.ok(await page.locator('#labs table tbody tr').count() > 0, 'test results listed');
  await shot(page, 'portal.png');
  // Staff pages are closed to a patient.
  const res = await page.goto('/patients');
  assert.equal(res.status(), 403);
  await ctx.close();
});

test('the record prints and downloads', async () => {
  const ctx = await newContext('patient-print');
  const page = await signIn(ctx, patient);
  await page.goto('/my/record/print');
  await assert.doesNotReject(page.getByRole('button', { name: 'Print or save as PDF' }).waitFor());
  assert.ok((await page.content()).includes(`Health record of ${target.given_name} ${target.family_name}`));
  await shot(page, 'portal-print.png');
  await page.goto('/my');
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.locator('#download-json').click(),
  ]);
  const bundle = JSON.parse(readFileSync(await download.path(), 'utf8'));
  assert.equal(bundle.resourceType, 'Bundle');
  assert.equal(bundle.type, 'collection');
  assert.ok(bundle.entry.some((e) => e.resource.resourceType === 'Patient' && e.resource.id === target.id));
  await ctx.close();
});

test('a restriction, a correction request, a denial and a statement of disagreement', async () => {
  const ctx = await newContext('patient-requests');
  const page = await signIn(ctx, patient);
  await page.goto('/my/restrictions');
  await page.locator('select[name=category]').selectOption('PSY');
  await page.locator('input[name=role][value=admin]').check();
  await Promise.all([page.waitForURL(/ok=saved/), page.getByRole('button', { name: 'Restrict' }).click()]);
  assert.ok((await page.locator('#restrictions').textContent()).includes('behavioural and mental health'));
  await shot(page, 'portal-restrictions.png');

  await page.goto('/my/amendments');
  await page.locator('select[name=target]').selectOption('patient:family_name');
  await page.locator('textarea[name=requested]').fill(`${target.family_name}-Smith`);
  await page.locator('textarea[name=reason]').fill('I married and took a double name.');
  await Promise.all([page.waitForURL(/ok=created/), page.getByRole('button', { name: 'Send the request' }).click()]);
  assert.ok((await page.locator('#amendments').textContent()).includes('pending'));

  // The doctor: the chart says something is withheld and lists the request; denies it.
  const dctx = await newContext('doctor');
  const d = await signIn(dctx, doctor);
  await d.goto(`/patients/${target.id}`);
  assert.ok((await d.locator('#withheld').textContent()).includes('1 item is withheld'));
  assert.ok(!(await d.content()).includes('Generalised anxiety disorder'), 'the restricted record is not on the doctor\'s chart');
  assert.ok((await d.locator('#patient-requests').textContent()).includes('Demographics: family name'));
  await shot(d, 'chart-restricted.png');
  await d.goto('/amendments');
  await Promise.all([d.waitForURL(/\/amendments\/[0-9a-f-]+$/), d.getByRole('link', { name: 'Review' }).first().click()]);
  await shot(d, 'amendment-review.png');
  await d.locator('textarea[name=reason]').fill('A name change needs the marriage certificate at the front desk.');
  await Promise.all([d.waitForURL(/ok=saved/), d.getByRole('button', { name: 'Deny' }).click()]);
  await dctx.close();

  await page.goto('/my/amendments');
  assert.ok((await page.content()).includes('marriage certificate'));
  await page.locator('textarea[name=statement]').fill('I sent the certificate by post in March.');
  await Promise.all([page.waitForURL(/ok=saved/), page.getByRole('button', { name: 'Add my statement' }).click()]);
  assert.ok((await page.content()).includes('I sent the certificate by post in March.'));
  await shot(page, 'portal-amendments.png');
  await ctx.close();
});

test('the patient reads who accessed their record, on a phone too', async () => {
  const ctx = await newContext('patient-phone', { viewport: PHONE });
  const page = await signIn(ctx, patient);
  await page.goto('/my/disclosures');
  const text = await page.locator('main').textContent();
  assert.ok(text.includes(doctor.username), 'the doctor\'s reads are listed');
  assert.ok(!text.includes(patient.username), 'their own reads are not');
  await shot(page, 'portal-disclosures-phone.png');
  await page.goto('/my');
  await shot(page, 'portal-phone.png');
  await ctx.close();
});

test('no page had a CSP violation, a console error or an uncaught error', () => {
  if (warnings.length) console.log(warnings.join('\n'));
  assert.deepEqual(problems, []);
});
