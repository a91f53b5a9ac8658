//! Rate limiting: a generic cell-rate algorithm (GCRA) per client and endpoint.
//!
//! Each `(METHOD /route/pattern, client)` pair has a *theoretical arrival time* (TAT).
//! A rate of `count` per `period` with `burst` B spaces requests by `T = period /
//! count` and tolerates `τ = B·T` of backlog: a request is let through when, after it,
//! the TAT is at most `τ` ahead of now. That is one number per key, updated in one step.
//!
//! - Alone, the limiter keeps the TATs in memory ([`Local`]).
//! - With `redis.url`, the TATs live in Redis and each check is one Lua script
//!   ([`GCRA_SCRIPT`]), so every instance draws on one budget (large budgets are taken
//!   a few requests per round trip, see [`Gcra::lease_size`]). If Redis fails, the
//!   check falls back to the local limiter for a second at a time, says so in the log
//!   (once per outage) and in `/ready`, and never lets requests through unchecked.
//!
//! The client is the authenticated principal (its user) when the request carries a
//! valid bearer token, otherwise the client address (after `server.trusted_proxies`).

pub mod middleware;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::SharedClock;
use crate::config::{Per, Rate, RateLimitConfig};

/// The limits of the login, password and token endpoints unless `rate_limit.routes`
/// names them: brute force and credential stuffing need many attempts per client.
pub const STRICT_DEFAULTS: &[(&str, &str)] = &[
    ("POST /api/v1/auth/login", "10/m"),
    ("POST /api/v1/auth/password", "10/m"),
    ("POST /api/v1/auth/totp/confirm", "10/m"),
    ("POST /api/v1/auth/passkey/challenge", "10/m"),
    ("POST /api/v1/auth/passkey/login", "10/m"),
    ("POST /api/v1/auth/passkeys/register", "10/m"),
    ("POST /login/passkey", "10/m"),
    ("POST /api/v1/tokens", "30/m burst 10"),
    ("POST /api/v1/tokens/{id}/rotate", "30/m burst 10"),
    ("POST /api/v1/users/{id}/password", "30/m burst 10"),
    ("POST /login", "10/m"),
    ("POST /login/password", "10/m"),
    ("POST /admin/totp/confirm", "10/m"),
    ("POST /admin/tokens", "30/m burst 10"),
    ("POST /api/v1/auth/password-reset", "10/m"),
    ("POST /api/v1/auth/password-reset/confirm", "10/m"),
    ("POST /api/v1/auth/register", "10/m"),
    ("POST /api/v1/auth/email/verification", "10/m"),
    ("POST /api/v1/invitations/accept", "10/m"),
    ("POST /login/forgot", "10/m"),
    ("POST /accounts/reset/{token}", "10/m"),
    ("POST /accounts/invite/{token}", "10/m"),
];

/// The outcome of one check, with what the `RateLimit-*` headers report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `RateLimit-Limit`: the burst.
    pub limit: u32,
    /// `RateLimit-Remaining`: requests that could be made at once now.
    pub remaining: u32,
    /// `RateLimit-Reset`: seconds until the budget is whole again.
    pub reset: u64,
    /// `Retry-After` when refused: seconds until one request is allowed.
    pub retry_after: u64,
}

/// A rate in microseconds: spacing `t` and tolerance `tau`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    pub t: i64,
    pub tau: i64,
    pub burst: u32,
}

impl Gcra {
    pub fn of(rate: Rate) -> Self {
        let period: i64 = match rate.per {
            Per::Second => 1_000_000,
            Per::Minute => 60_000_000,
            Per::Hour => 3_600_000_000,
        };
        let t = (period / i64::from(rate.count.max(1))).max(1);
        let burst = rate.burst.max(1);
        Self {
            t,
            tau: t.saturating_mul(i64::from(burst)),
            burst,
        }
    }

    /// One request at `now` against the stored TAT: the new TAT to store (when
    /// allowed) and the decision.
    pub fn check(&self, tat: Option<i64>, now: i64) -> (Option<i64>, Decision) {
        let tat = tat.unwrap_or(now).max(now);
        let new_tat = tat.saturating_add(self.t);
        let ahead = new_tat - now;
        if ahead > self.tau {
            let retry = ahead - self.tau;
            (
                None,
                Decision {
                    allowed: false,
                    limit: self.burst,
                    remaining: 0,
                    reset: ceil_secs(tat - now),
                    retry_after: ceil_secs(retry).max(1),
                },
            )
        } else {
            (Some(new_tat), self.decision_after(ahead))
        }
    }

    /// How many requests one Redis round trip takes for an instance to spend locally:
    /// a twentieth of the burst, at most 50, and 1 (exact) for small budgets such as
    /// sign-in. Taken requests are charged in Redis before they are spent, so over any
    /// period a client gets no more than its budget (leased requests not spent within
    /// their time lapse); spending may lag charging by up to [`LEASE_MIN`], so at one
    /// moment a client may see up to `lease_size - 1` more per instance than the burst.
    pub fn lease_size(&self) -> u32 {
        (self.burst / 20).clamp(1, 50)
    }

    /// What [`GCRA_SCRIPT`] does, for the tests: `(new TAT, taken, µs ahead or until
    /// one fits)`.
    pub fn take(&self, tat: Option<i64>, now: i64, want: u32) -> (i64, u32, i64) {
        let tat = tat.unwrap_or(now).max(now);
        let fit = (self.tau - (tat - now)).div_euclid(self.t);
        if fit < 1 {
            return (tat, 0, tat + self.t - now - self.tau);
        }
        let fit = fit.min(i64::from(want.max(1)));
        let new_tat = tat + fit * self.t;
        (new_tat, u32::try_from(fit).unwrap_or(0), new_tat - now)
    }

    fn decision_after(&self, ahead: i64) -> Decision {
        let remaining = ((self.tau - ahead) / self.t).clamp(0, i64::from(self.burst));
        Decision {
            allowed: true,
            limit: self.burst,
            remaining: u32::try_from(remaining).unwrap_or(0),
            reset: ceil_secs(ahead),
            retry_after: 0,
        }
    }
}

fn ceil_secs(micros: i64) -> u64 {
    u64::try_from(micros.max(0))
        .unwrap_or(0)
        .div_ceil(1_000_000)
}

const SHARDS: usize = 16;
/// Past this many keys a shard drops the ones whose budget is whole again.
const SHARD_SWEEP: usize = 4096;

/// TATs in this process's memory.
pub struct Local {
    /// Each shard: the TATs, and the size at which it next sweeps.
    shards: Vec<Mutex<(HashMap<String, i64>, usize)>>,
    hasher: std::collections::hash_map::RandomState,
    sweep_at: usize,
}

impl Default for Local {
    fn default() -> Self {
        Self::with_sweep(SHARD_SWEEP)
    }
}

impl Local {
    fn with_sweep(sweep_at: usize) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new((HashMap::new(), sweep_at)))
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            sweep_at,
        }
    }

    pub fn check(&self, key: &str, gcra: Gcra, now: i64) -> Decision {
        let i = usize::try_from(self.hasher.hash_one(key) % SHARDS as u64).unwrap_or(0);
        let Some(shard) = self.shards.get(i) else {
            return refuse(gcra);
        };
        // A poisoned lock only means another request panicked mid-update; the map
        // itself is still a map of numbers.
        let mut guard = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (map, next_sweep) = &mut *guard;
        let (new_tat, decision) = gcra.check(map.get(key).copied(), now);
        if let Some(t) = new_tat {
            if map.len() >= *next_sweep {
                // Keys whose TAT is past have their whole budget: same as absent.
                map.retain(|_, tat| *tat > now);
                *next_sweep = (map.len() * 2).max(self.sweep_at);
            }
            map.insert(key.to_owned(), t);
        }
        decision
    }
}

fn refuse(gcra: Gcra) -> Decision {
    Decision {
        allowed: false,
        limit: gcra.burst,
        remaining: 0,
        reset: 1,
        retry_after: 1,
    }
}

/// The check as one atomic Redis script. KEYS[1] the key; ARGV: now, T and τ in µs,
/// and how many requests to take at once (a lease, see [`Gcra::lease_size`]).
/// Takes as many as fit, up to that number; returns `{taken, µs ahead after taking
/// (or until one fits, when none did), µs ahead before}`. Numbers stay below 2^53, so
/// Lua's doubles hold them exactly; `%.0f` writes them back without an exponent.
pub const GCRA_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local t = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local fit = math.floor((tau - (tat - now)) / t)
if fit < 1 then
  return {0, tat + t - now - tau, tat - now}
end
if fit > want then fit = want end
local new_tat = tat + fit * t
local ahead = new_tat - now
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor(ahead / 1000) + 1000)
return {fit, ahead, tat - now}
";

/// Leased requests may be spent this long (µs) after they were charged, at least.
const LEASE_MIN: i64 = 250_000;
/// How long one Redis check may take before the local limiter answers instead.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// After a Redis failure, how long the local limiter answers before Redis is tried again.
const REDIS_RETRY_MICROS: i64 = 1_000_000;

struct Shared {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    script: redis::Script,
    prefix: String,
    /// While now is before this (µs), Redis is not tried.
    down_until: AtomicI64,
    /// Requests taken from Redis and not yet spent here: key → lease.
    leases: Mutex<HashMap<String, Lease>>,
    /// One lease request per key at a time: the others wait for it and spend from it,
    /// instead of each taking requests that a burst then finds spent.
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    degraded: AtomicBool,
}

/// Counters for `/metrics`.
#[derive(Default, Debug)]
pub struct LimiterStats {
    pub allowed: AtomicU64,
    pub refused: AtomicU64,
    pub redis_failures: AtomicU64,
}

/// The limiter of one server: rates by route, local TATs, and Redis when configured.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    enabled: bool,
    default: Gcra,
    routes: HashMap<String, Gcra>,
    local: Local,
    shared: Option<Shared>,
    clock: SharedClock,
    stats: LimiterStats,
}

/// Where checks are decided, for `/ready` and `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off,
    Local,
    Shared,
    /// Redis is configured but failing: the local limiter answers.
    Degraded,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Local => "local",
            Mode::Shared => "shared",
            Mode::Degraded => "degraded",
        }
    }
}

impl Limiter {
    /// `prefix` separates the keys of one installation (one database) from others
    /// sharing the Redis server.
    pub fn new(
        cfg: &RateLimitConfig,
        redis: Option<redis::Client>,
        prefix: &str,
        clock: SharedClock,
    ) -> Self {
        let mut routes: HashMap<String, Gcra> = STRICT_DEFAULTS
            .iter()
            .filter_map(|(route, rate)| Some(((*route).to_owned(), Gcra::of(rate.parse().ok()?))))
            .collect();
        for (route, rate) in &cfg.routes {
            routes.insert(normalise_route(route), Gcra::of(*rate));
        }
        let shared = redis.map(|client| Shared {
            client,
            conn: tokio::sync::Mutex::new(None),
            script: redis::Script::new(GCRA_SCRIPT),
            prefix: format!("custodian:rl:{prefix}:"),
            down_until: AtomicI64::new(0),
            leases: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            degraded: AtomicBool::new(false),
        });
        Self {
            inner: Arc::new(Inner {
                enabled: cfg.enabled,
                default: Gcra::of(cfg.default),
                routes,
                local: Local::default(),
                shared,
                clock,
                stats: LimiterStats::default(),
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    pub fn mode(&self) -> Mode {
        match (&self.inner.shared, self.inner.enabled) {
            (_, false) => Mode::Off,
            (None, true) => Mode::Local,
            (Some(s), true) if s.degraded.load(Ordering::Relaxed) => Mode::Degraded,
            (Some(_), true) => Mode::Shared,
        }
    }

    pub fn stats(&self) -> &LimiterStats {
        &self.inner.stats
    }

    /// The rate of `route` (`"METHOD /pattern"`).
    pub fn rate_for(&self, route: &str) -> Gcra {
        self.inner
            .routes
            .get(route)
            .copied()
            .unwrap_or(self.inner.default)
    }

    fn now_micros(&self) -> i64 {
        let t = self.inner.clock.now();
        let nanos = t.unix_timestamp_nanos() / 1000;
        i64::try_from(nanos).unwrap_or(i64::MAX)
    }

    /// One request of `client` on `route`.
    pub async fn check(&self, route: &str, client: &str) -> Decision {
        let gcra = self.rate_for(route);
        let key = format!("{route}|{client}");
        let now = self.now_micros();
        let decision = match &self.inner.shared {
            Some(shared) if now >= shared.down_until.load(Ordering::Relaxed) => {
                match tokio::time::timeout(REDIS_TIMEOUT, shared.check(&key, gcra, now)).await {
                    Ok(Ok(d)) => {
                        if shared.degraded.swap(false, Ordering::Relaxed) {
                            tracing::warn!(
                                "rate limit: Redis answers again; limits are shared between instances"
                            );
                        }
                        d
                    }
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => e.kind_str(),
                            _ => "timeout",
                        };
                        self.inner
                            .stats
                            .redis_failures
                            .fetch_add(1, Ordering::Relaxed);
                        shared
                            .down_until
                            .store(now + REDIS_RETRY_MICROS, Ordering::Relaxed);
                        *shared.conn.lock().await = None;
                        if !shared.degraded.swap(true, Ordering::Relaxed) {
                            tracing::error!(
                                error = why,
                                "rate limit: Redis failed; each instance limits on its own until it answers (/ready reports degraded)"
                            );
                        }
                        self.inner.local.check(&key, gcra, now)
                    }
                }
            }
            _ => self.inner.local.check(&key, gcra, now),
        };
        let counter = if decision.allowed {
            &self.inner.stats.allowed
        } else {
            &self.inner.stats.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        decision
    }
}

/// Why a Redis check failed, without the URL or anything else from the error text.
#[derive(Debug)]
enum RedisFailure {
    Connect,
    Command,
    Reply,
}

impl RedisFailure {
    fn kind_str(&self) -> &'static str {
        match self {
            RedisFailure::Connect => "connect",
            RedisFailure::Command => "command",
            RedisFailure::Reply => "reply",
        }
    }
}

/// Requests an instance took from Redis ahead of time for one key.
#[derive(Clone, Copy, Debug)]
struct Lease {
    left: u32,
    /// µs: unused requests lapse then (they have been charged already).
    until: i64,
    /// What the headers say while spending it.
    decision: Decision,
}

impl Shared {
    /// Spends one leased request, if there is one.
    fn spend_lease(&self, key: &str, now: i64) -> Option<Decision> {
        let mut leases = self
            .leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let lease = leases.get_mut(key)?;
        if lease.left == 0 || now >= lease.until {
            leases.remove(key);
            return None;
        }
        lease.left -= 1;
        let mut d = lease.decision;
        // Left here plus left in Redis.
        d.remaining = d.remaining.saturating_add(lease.left);
        if lease.left == 0 {
            leases.remove(key);
        }
        Some(d)
    }

    /// Keeps leased requests; several requests that found no lease at the same moment
    /// each bring some, and they add up rather than replace each other.
    fn keep_lease(&self, key: &str, lease: Lease, now: i64) {
        let mut leases = self
            .leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if leases.len() >= SHARD_SWEEP * SHARDS {
            leases.retain(|_, l| l.until > now);
        }
        match leases.get_mut(key) {
            Some(l) if l.until > now => {
                l.left = l.left.saturating_add(lease.left);
                l.until = l.until.max(lease.until);
                l.decision = lease.decision;
            }
            _ => {
                leases.insert(key.to_owned(), lease);
            }
        }
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, RedisFailure> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(|_| RedisFailure::Connect)?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn check(&self, key: &str, gcra: Gcra, now: i64) -> Result<Decision, RedisFailure> {
        if let Some(d) = self.spend_lease(key, now) {
            return Ok(d);
        }
        let want = gcra.lease_size();
        if want == 1 {
            return self.take(key, gcra, now, want).await;
        }
        let turn = {
            let mut turns = self
                .turns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            turns.entry(key.to_owned()).or_default().clone()
        };
        let result = {
            let _mine = turn.lock().await;
            // Whoever had the turn before may have left a lease.
            match self.spend_lease(key, now) {
                Some(d) => Ok(d),
                None => self.take(key, gcra, now, want).await,
            }
        };
        let mut turns = self
            .turns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The map and this function hold the last two references: nobody waits.
        if Arc::strong_count(&turn) <= 2 {
            turns.remove(key);
        }
        result
    }

    /// One round trip: takes up to `want` requests for `key`.
    async fn take(
        &self,
        key: &str,
        gcra: Gcra,
        now: i64,
        want: u32,
    ) -> Result<Decision, RedisFailure> {
        let mut conn = self.connection().await?;
        let reply: Vec<i64> = self
            .script
            .key(format!("{}{key}", self.prefix))
            .arg(now)
            .arg(gcra.t)
            .arg(gcra.tau)
            .arg(want)
            .invoke_async(&mut conn)
            .await
            .map_err(|_| RedisFailure::Command)?;
        match reply.as_slice() {
            [0, retry, ahead_now] => Ok(Decision {
                allowed: false,
                limit: gcra.burst,
                remaining: 0,
                reset: ceil_secs(*ahead_now),
                retry_after: ceil_secs(*retry).max(1),
            }),
            [taken, ahead, _] if *taken >= 1 => {
                let taken = u32::try_from(*taken).unwrap_or(1);
                let decision = gcra.decision_after(*ahead);
                let first = Decision {
                    remaining: decision.remaining.saturating_add(taken - 1),
                    ..decision
                };
                if taken > 1 {
                    // The rest is spent here, within the time it took to earn or
                    // LEASE_MIN, whichever is longer; then it lapses.
                    let span = gcra.t.saturating_mul(i64::from(taken)).max(LEASE_MIN);
                    self.keep_lease(
                        key,
                        Lease {
                            left: taken - 1,
                            until: now.saturating_add(span),
                            decision,
                        },
                        now,
                    );
                }
                Ok(first)
            }
            _ => Err(RedisFailure::Reply),
        }
    }
}

/// `"post  /api/v1/x"` → `"POST /api/v1/x"`: the form route keys are compared in.
pub fn normalise_route(route: &str) -> String {
    let mut words = route.split_whitespace();
    match (words.next(), words.next()) {
        (Some(m), Some(p)) => format!("{} {p}", m.to_ascii_uppercase()),
        _ => route.trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Gcra {
        Gcra::of(s.parse().unwrap())
    }

    #[test]
    fn a_burst_then_one_per_interval() {
        let g = rate("10/m burst 3");
        let local = Local::default();
        let t0 = 1_000_000_000_000;
        let d: Vec<Decision> = (0..4).map(|_| local.check("k", g, t0)).collect();
        assert_eq!(
            d.iter().map(|d| d.allowed).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert_eq!(
            d.iter().map(|d| d.remaining).collect::<Vec<_>>(),
            [2, 1, 0, 0]
        );
        assert_eq!(d[3].retry_after, 6);
        assert_eq!(d[2].reset, 18);
        // Six seconds later exactly one more fits.
        assert!(local.check("k", g, t0 + 6_000_000).allowed);
        assert!(!local.check("k", g, t0 + 6_000_000).allowed);
        // Other keys have their own budget.
        assert!(local.check("other", g, t0).allowed);
    }

    #[test]
    fn the_budget_refills_and_never_exceeds_the_burst() {
        let g = rate("5/s");
        let local = Local::default();
        let t0 = 5_000_000_000;
        for _ in 0..5 {
            assert!(local.check("k", g, t0).allowed);
        }
        assert!(!local.check("k", g, t0).allowed);
        let d = local.check("k", g, t0 + 3_600_000_000);
        assert!(d.allowed);
        assert_eq!(d.remaining, 4);
    }

    #[test]
    fn a_refused_request_does_not_spend_budget() {
        let g = rate("1/s");
        let local = Local::default();
        assert!(local.check("k", g, 0).allowed);
        for _ in 0..100 {
            assert!(!local.check("k", g, 500_000).allowed);
        }
        assert!(local.check("k", g, 1_000_000).allowed);
    }

    #[test]
    fn sweeping_drops_only_spent_keys() {
        let g = rate("1/s");
        let local = Local::with_sweep(8);
        for i in 0..512 {
            local.check(&format!("k{i}"), g, 0);
        }
        let total =
            |l: &Local| -> usize { l.shards.iter().map(|s| s.lock().unwrap().0.len()).sum() };
        assert_eq!(total(&local), 512, "live keys are kept");
        // Much later every budget is whole: growing shards drop the spent keys.
        for i in 0..512 {
            local.check(&format!("late{i}"), g, 10_000_000);
        }
        assert!(total(&local) < 1024, "{}", total(&local));
    }

    #[test]
    fn sweeping_keeps_live_keys() {
        let g = rate("1/h");
        let local = Local::default();
        for i in 0..(SHARD_SWEEP * SHARDS) {
            local.check(&format!("k{i}"), g, 0);
        }
        // Keys still inside their hour were kept: the first is still refused.
        assert!(!local.check("k0", g, 1).allowed);
    }

    #[test]
    fn taking_several_never_exceeds_the_budget() {
        let g = rate("100/s burst 200");
        assert_eq!(g.lease_size(), 10);
        assert_eq!(rate("10/m").lease_size(), 1, "sign-in stays exact");
        // Taking ten at a time from a full budget: twenty takes, then nothing.
        let mut tat = None;
        let mut total = 0;
        for _ in 0..25 {
            let (new_tat, taken, _) = g.take(tat, 0, 10);
            tat = Some(new_tat);
            total += taken;
        }
        assert_eq!(total, 200);
        // Take what fits when fewer than asked remain.
        let (_, taken, _) = g.take(tat, 35_000, 10);
        assert_eq!(taken, 3, "35 ms refill three at 10 ms each");
        // Single takes agree with the one-request check.
        let one = rate("3/m");
        let (t1, n1, _) = one.take(None, 0, 1);
        assert_eq!(n1, 1);
        assert_eq!(one.check(None, 0).0, Some(t1));
    }

    #[test]
    fn routes_are_normalised_and_strict_defaults_apply() {
        assert_eq!(normalise_route(" post   /api/v1/x "), "POST /api/v1/x");
        for (_, r) in STRICT_DEFAULTS {
            assert!(r.parse::<Rate>().is_ok(), "{r}");
        }
    }
}
