// A tiny SMART authorization server, FHIR server and "EHR" page for the browser test of
// the framed SMART app. It serves the synthetic patients of tests/fixtures/smart/ and
// approves every authorization at once. The EHR page is served as http://localhost:PORT
// (another site than Custodian's http://127.0.0.1), so the app runs in a cross-site frame.
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { repoRoot } from './server.mjs';

const patients = {
  'p-high': JSON.parse(readFileSync(join(repoRoot, 'tests', 'fixtures', 'smart', 'p-high.json'), 'utf8')),
};

export async function startFixture() {
  const codes = new Map();
  const tokens = new Map();
  let base = '';
  const server = createServer((req, res) => {
    const url = new URL(req.url, base);
    const json = (status, body) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    if (url.pathname === '/ehr') {
      const app = url.searchParams.get('app');
      const launch = `${app}/smart/launch?iss=${encodeURIComponent(`${base}/fhir`)}&launch=p-high`;
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(`<!doctype html><title>EHR</title><link rel="icon" href="data:,"><h1>EHR chart</h1><iframe id="app" title="PRECISE-HBR" src="${launch}" width="1000" height="1400"></iframe>`);
      return;
    }
    if (url.pathname === '/fhir/.well-known/smart-configuration') {
      json(200, { authorization_endpoint: `${base}/auth/authorize`, token_endpoint: `${base}/auth/token`, code_challenge_methods_supported: ['S256'] });
      return;
    }
    if (url.pathname === '/auth/authorize') {
      const q = url.searchParams;
      const code = randomBytes(8).toString('hex');
      codes.set(code, { challenge: q.get('code_challenge'), redirect: q.get('redirect_uri'), patient: q.get('launch') || 'p-high' });
      const back = new URL(q.get('redirect_uri'));
      back.searchParams.set('code', code);
      back.searchParams.set('state', q.get('state'));
      res.writeHead(303, { location: back.toString() });
      res.end();
      return;
    }
    if (url.pathname === '/auth/token' && req.method === 'POST') {
      let body = '';
      req.on('data', (c) => { body += c; });
      req.on('end', () => {
        const f = new URLSearchParams(body);
        const grant = codes.get(f.get('code'));
        codes.delete(f.get('code'));
        const s256 = createHash('sha256').update(f.get('code_verifier') || '').digest('base64url');
        if (!grant || grant.challenge !== s256 || grant.redirect !== f.get('redirect_uri')) {
          json(400, { error: 'invalid_grant' });
          return;
        }
        const token = randomBytes(16).toString('hex');
        tokens.set(token, grant.patient);
        json(200, { access_token: token, token_type: 'Bearer', expires_in: 3600, scope: 'launch patient/*.rs', patient: grant.patient });
      });
      return;
    }
    const auth = (req.headers.authorization || '').replace(/^Bearer /, '');
    const patient = tokens.get(auth);
    if (!patient) { json(401, {}); return; }
    const data = patients[patient];
    const m = url.pathname.match(/^\/fhir\/(Patient|Observation|Condition|MedicationRequest|Procedure)(?:\/([^/]+))?$/);
    if (!m) { json(404, {}); return; }
    if (m[1] === 'Patient') { json(200, { ...data.Patient, id: m[2] }); return; }
    json(200, { resourceType: 'Bundle', type: 'searchset', entry: (data[m[1]] || []).map((r) => ({ resource: r })) });
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  const { port } = server.address();
  base = `http://127.0.0.1:${port}`;
  return {
    base,
    ehrOrigin: `http://localhost:${port}`,
    stop: () => new Promise((ok) => server.close(ok)),
  };
}
