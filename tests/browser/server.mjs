// Starts a throwaway Custodian server for the browser tests: an empty temporary
// directory (so no config file applies), no inherited CUSTODIAN_* variables, fast
// argon2, a 5-minute idle timeout, and an admin created through the CLI before
// serving (so the dev bootstrap creates nobody).
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, '..', '..');

export const ADMIN = Object.freeze({
  username: 'admin',
  // The policy refuses a password that contains the username, so not "Admin-…".
  password: 'Steward-Pass-12345!',
});

function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', fail);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

function cleanEnv(dir) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith('CUSTODIAN_')) env[k] = v;
  }
  return Object.assign(env, {
    CUSTODIAN_DATA_DIR: join(dir, 'data'),
    CUSTODIAN_PASSWORD__HASH_MEMORY_KIB: '1024',
    CUSTODIAN_PASSWORD__HASH_ITERATIONS: '1',
    CUSTODIAN_SESSION__IDLE_TIMEOUT: '5m',
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Start the server (`env`: extra CUSTODIAN_* variables). Returns { baseURL, logPath, stop() }. stop() is idempotent and
 * also runs on process exit, so the server never outlives the test run.
 */
export async function startServer({ bin = process.env.CUSTODIAN_BIN || join(repoRoot, 'target', 'debug', 'custodian'), env: extra = {} } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'custodian-browser-'));
  const work = join(dir, 'cwd');
  mkdirSync(work);
  const env = Object.assign(cleanEnv(dir), extra);

  const created = spawnSync(
    bin,
    ['user', 'create', '--username', ADMIN.username, '--role', 'admin', '--password-stdin'],
    { cwd: work, env, input: `${ADMIN.password}\n`, encoding: 'utf8', timeout: 120_000 },
  );
  if (created.status !== 0) {
    throw new Error(
      `custodian user create failed (status ${created.status}, ${created.error ?? ''}):\n${created.stdout}\n${created.stderr}`,
    );
  }

  const port = await freePort();
  const baseURL = `http://127.0.0.1:${port}`;
  const logPath = join(dir, 'server.log');
  const log = openSync(logPath, 'a');
  const child = spawn(bin, ['serve', '--listen', `127.0.0.1:${port}`], {
    cwd: work,
    env,
    stdio: ['ignore', log, log],
  });
  closeSync(log);
  let exited = null;
  const exitedPromise = new Promise((r) => child.once('exit', (code, signal) => { exited = { code, signal }; r(); }));

  let stopped = false;
  const onExit = () => { if (!stopped && exited === null) child.kill('SIGKILL'); };
  process.on('exit', onExit);

  async function stop({ keep = false } = {}) {
    if (stopped) return;
    stopped = true;
    if (exited === null) {
      child.kill('SIGTERM');
      const killed = await Promise.race([exitedPromise.then(() => true), sleep(5000).then(() => false)]);
      if (!killed) { child.kill('SIGKILL'); await exitedPromise; }
    }
    process.off('exit', onExit);
    if (!keep) rmSync(dir, { recursive: true, force: true });
  }

  const deadline = Date.now() + 60_000;
  for (;;) {
    if (exited !== null) {
      const out = readFileSync(logPath, 'utf8');
      await stop({ keep: true });
      throw new Error(`custodian serve exited early (${JSON.stringify(exited)}):\n${out}`);
    }
    try {
      const res = await fetch(`${baseURL}/health`, { signal: AbortSignal.timeout(2000) });
      if (res.status === 200) break;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) {
      const out = readFileSync(logPath, 'utf8');
      await stop({ keep: true });
      throw new Error(`custodian serve: GET /health was not 200 within 60 s; log ${logPath}:\n${out}`);
    }
    await sleep(200);
  }

  return { baseURL, logPath, dir, bin, cwd: work, env, stop, log: () => readFileSync(logPath, 'utf8') };
}
