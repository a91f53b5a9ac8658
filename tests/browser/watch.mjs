// Shared by the browser tests. watch(): what they hold against every page — a CSP
// violation, a console error (other than Chromium's note of a 4xx page, which the pages
// answer by design) or an uncaught error is a problem; console warnings are reported,
// not failed. signIn(): the sign-in form.
//
//   const problems = [], warnings = [];
//   await watch(context, 'doctor', problems, warnings);   // before the first page
//   ...
//   assert.deepEqual(problems, []);                        // the last test
export async function watch(context, label, problems, warnings) {
  await context.exposeBinding('__cspReport', ({ page: p }, v) => {
    problems.push(`[${label}] CSP violation on ${p.url()}: ${v.effectiveDirective} blocked ${v.blockedURI || '(inline)'} `
      + `at ${v.sourceFile || '?'}:${v.lineNumber || '?'} (${v.sample || 'no sample'})`);
  });
  await context.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) => {
      if (typeof window.__cspReport === 'function') {
        window.__cspReport({
          effectiveDirective: e.effectiveDirective, blockedURI: e.blockedURI,
          sourceFile: e.sourceFile, lineNumber: e.lineNumber, sample: e.sample,
        });
      }
    });
  });
  const onPage = (p) => {
    p.on('console', (m) => {
      const line = `[${label}] console.${m.type()} on ${p.url()}: ${m.text()}`;
      // A 4xx page (403, 409, 422 by design) is logged by Chromium as a failed load.
      if (m.type() === 'error' && !/status of 4\d\d/.test(m.text())) problems.push(line);
      else if (m.type() === 'warning') warnings.push(line);
    });
    p.on('pageerror', (err) => problems.push(`[${label}] uncaught error on ${p.url()}: ${err.stack || err}`));
  };
  context.on('page', onPage);
}

/** Signs in through the form in context `c`; returns the page it lands on. */
export async function signIn(c, who) {
  const p = await c.newPage();
  await p.goto('/login');
  await p.locator('input[name=username]').fill(who.username);
  await p.locator('input[name=password]').fill(who.password);
  await Promise.all([
    p.waitForURL((u) => u.pathname !== '/login'),
    p.getByRole('button', { name: 'Sign in', exact: true }).click(),
  ]);
  return p;
}
