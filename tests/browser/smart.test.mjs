// Browser test of the SMART app framed by an EHR: an "EHR" page on another site frames
// /smart/launch; the user signs in inside the frame; the launch goes through the
// authorization server and back; the app shows the PRECISE-HBR score, all inside the
// frame, with no CSP violation and no console error. Then the what-if form, and the plain
// calculator page of the admin GUI.
//
//   cd tests/browser && npm ci && node --test smart.test.mjs   (or: bash tests/browser/run.sh)
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { ADMIN, repoRoot, startServer } from './server.mjs';
import { startFixture } from './smart-fixture.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

let fixture;
let server;
let browser;
const problems = [];

function watch(page, label) {
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`[${label}] console.error on ${page.url()}: ${m.text()}`); });
  page.on('pageerror', (err) => problems.push(`[${label}] uncaught error on ${page.url()}: ${err}`));
}

async function cspWatch(context) {
  await context.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) => {
      console.error(`CSP violation: ${e.effectiveDirective} blocked ${e.blockedURI || '(inline)'}`);
    });
  });
}

before(async () => {
  fixture = await startFixture();
  server = await startServer({
    env: {
      CUSTODIAN_SMART__ALLOWED_ISSUERS: `${fixture.base}/fhir`,
      CUSTODIAN_SMART__FRAME_ANCESTORS: fixture.ehrOrigin,
    },
  });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
}, { timeout: 180_000 });

after(async () => {
  try {
    if (browser) await browser.close();
  } finally {
    if (server) await server.stop();
    if (fixture) await fixture.stop();
  }
});

test('an EHR frames the app: sign in, launch and the score, all inside the frame', { timeout: 90_000 }, async () => {
  problems.length = 0;
  const context = await browser.newContext({ viewport: { width: 1280, height: 1600 } });
  context.setDefaultTimeout(20_000);
  await cspWatch(context);
  const page = await context.newPage();
  watch(page, 'ehr');
  await page.goto(`${fixture.ehrOrigin}/ehr?app=${encodeURIComponent(server.baseURL)}`);
  const frame = page.frameLocator('#app');
  // Not signed in to Custodian yet: the sign-in form, inside the frame.
  await frame.getByLabel('Username').fill(ADMIN.username);
  await frame.getByLabel('Password').fill(ADMIN.password);
  await frame.getByRole('button', { name: 'Sign in', exact: true }).click();
  // The launch runs through the authorization server and back to the app.
  await frame.locator('#score').waitFor({ timeout: 30_000 });
  assert.equal(await frame.locator('#score').innerText(), '43');
  assert.match(await frame.locator('#category').innerText(), /Very high bleeding risk/);
  assert.match(await frame.locator('.patient-header').innerText(), /Walter Testpatient/);
  assert.match(await frame.locator('table').innerText(), /Observation\/hb-new/);
  assert.equal(await frame.locator('.phi-banner').count(), 1);
  // The fixture's FHIR server does not offer MedicationStatement (404): a note, not a failure.
  assert.match(await frame.locator('body').innerText(), /MedicationStatement was not read: not found on the FHIR server \(404\)/);
  const appFrame = page.frames().find((f) => f.url().startsWith(`${server.baseURL}/smart/app`));
  assert.ok(appFrame, `the app is in the frame (frames: ${page.frames().map((f) => f.url()).join(', ')})`);

  // What-if inside the frame: hemoglobin 14.9 → 34, marked as an override.
  await frame.getByLabel('Hemoglobin (g/dL)').fill('14.9');
  await frame.getByRole('button', { name: 'Calculate' }).click();
  await frame.locator('#overrides').waitFor();
  assert.equal(await frame.locator('#score').innerText(), '34');
  assert.match(await frame.locator('tr.override').first().innerText(), /override/);
  // SCREENSHOTS=1 retakes the one in docs/screenshots/ (as for the admin pages).
  const shot = process.env.SCREENSHOTS === '1'
    ? join(repoRoot, 'docs', 'screenshots', 'smart-app.png')
    : join(tmpdir(), 'custodian-smart-app.png');
  await page.screenshot({ path: shot, fullPage: true });
  await context.close();
  if (problems.length) assert.fail(problems.join('\n'));
});

test('the calculator page from the admin GUI', { timeout: 60_000 }, async () => {
  problems.length = 0;
  const context = await browser.newContext({ baseURL: server.baseURL });
  await cspWatch(context);
  const page = await context.newPage();
  watch(page, 'calculator');
  await page.goto('/login');
  await page.getByLabel('Username').fill(ADMIN.username);
  await page.getByLabel('Password').fill(ADMIN.password);
  await page.getByRole('button', { name: 'Sign in', exact: true }).click();
  await page.waitForURL((u) => u.pathname === '/admin');
  await page.getByRole('link', { name: 'PRECISE-HBR' }).click();
  await page.waitForURL((u) => u.pathname === '/smart/calculator');
  await page.getByLabel('Age (years)').fill('75');
  await page.getByLabel('Hemoglobin (g/dL)').fill('12');
  await page.getByLabel('eGFR (mL/min/1.73 m²)').fill('50');
  await page.getByLabel('White blood cells (10⁹/L)').fill('8');
  await page.getByRole('button', { name: 'Calculate' }).click();
  await page.locator('#score').waitFor();
  assert.equal(await page.locator('#score').innerText(), '28');
  assert.match(await page.locator('#risk').innerText(), /estimate/);
  // Only the hemoglobin: incomplete, a lower bound.
  await page.getByLabel('Age (years)').fill('');
  await page.getByLabel('eGFR (mL/min/1.73 m²)').fill('');
  await page.getByLabel('White blood cells (10⁹/L)').fill('');
  await page.getByRole('button', { name: 'Calculate' }).click();
  await page.locator('#missing').waitFor();
  assert.match(await page.locator('#category').innerText(), /Incomplete/);
  await context.close();
  if (problems.length) assert.fail(problems.join('\n'));
});
