//! Password policy and hashing.
//!
//! - [`Policy`]: the composition, length and blocklist rules of the configured profile
//!   (`hitrust`, the default, or `nist`), reporting every violation as a stable string.
//! - [`is_common`]: the common-password blocklist (`common-passwords.txt`, built into the
//!   binary; its header says where it comes from).
//! - [`Hasher`]: Argon2id on a bounded blocking pool, so a flood of logins cannot starve
//!   the rest of the server.
//!
//! Nothing here logs, prints or puts a password into an error.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration as StdDuration;

use argon2::password_hash::{PasswordHasher, PasswordVerifier, try_generate_salt};
use argon2::{ARGON2ID_IDENT, Algorithm, Argon2, Params, PasswordHash, Version};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::config::{PasswordConfig, PasswordPolicyName, Secret};

// ---------------------------------------------------------------------------------------
// Violations
// ---------------------------------------------------------------------------------------

/// Violation: fewer characters than the policy's `min_length`.
///
/// The violation strings are an API contract: they are returned in a 422 `violations`
/// list, so they never change.
pub const TOO_SHORT: &str = "too_short";
/// Violation: more characters than the policy's `max_length`.
pub const TOO_LONG: &str = "too_long";
/// Violation: no uppercase letter (when the policy requires one).
pub const MISSING_UPPERCASE: &str = "missing_uppercase";
/// Violation: no lowercase letter (when the policy requires one).
pub const MISSING_LOWERCASE: &str = "missing_lowercase";
/// Violation: no digit (when the policy requires one).
pub const MISSING_DIGIT: &str = "missing_digit";
/// Violation: no special character (when the policy requires one).
pub const MISSING_SPECIAL: &str = "missing_special";
/// Violation: the password is on the common-password blocklist (see [`is_common`]).
pub const COMMON_PASSWORD: &str = "common_password";
/// Violation: the password contains the username.
pub const CONTAINS_USERNAME: &str = "contains_username";
/// Violation: the password contains the e-mail address or its local part.
pub const CONTAINS_EMAIL: &str = "contains_email";
/// Violation: the password is one of the user's recent passwords. [`Policy::check`] never
/// returns it: the caller checks the history with [`Hasher::matches_any`].
pub const REUSED: &str = "reused";

// ---------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------

/// Longest password accepted by both profiles, in characters (NIST asks for at least 64).
const MAX_LENGTH: usize = 1024;
/// HITRUST: passwords expire after 90 days.
const HITRUST_MAX_AGE: StdDuration = StdDuration::from_secs(90 * 86_400);
/// The shortest username, e-mail or e-mail local part looked for inside a password.
const MIN_PERSONAL_LEN: usize = 3;

/// A password policy: the numbers and rules of a profile, after the config's overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Fewest characters (Unicode scalar values).
    pub min_length: usize,
    /// Most characters (Unicode scalar values).
    pub max_length: usize,
    /// At least one uppercase letter.
    pub require_upper: bool,
    /// At least one lowercase letter.
    pub require_lower: bool,
    /// At least one digit.
    pub require_digit: bool,
    /// At least one character that is not a letter or digit (a space counts).
    pub require_special: bool,
    /// A password older than this must be changed; `None`: passwords never expire.
    pub max_age: Option<StdDuration>,
    /// How many previous passwords may not be reused (0: no history check).
    pub history: u32,
}

impl Default for Policy {
    /// The `hitrust` profile.
    fn default() -> Self {
        Self::hitrust()
    }
}

impl Policy {
    /// The `hitrust` profile (the default): at least 8 and at most 1024 characters, upper
    /// and lower case, a digit and a special character, expiry after 90 days, and the last
    /// 5 passwords may not be reused.
    pub fn hitrust() -> Self {
        Self {
            min_length: 8,
            max_length: MAX_LENGTH,
            require_upper: true,
            require_lower: true,
            require_digit: true,
            require_special: true,
            max_age: Some(HITRUST_MAX_AGE),
            history: 5,
        }
    }

    /// The `nist` profile (SP 800-63B): at least 15 and at most 1024 characters, no
    /// composition rules, no expiry and no history (the config may set one).
    pub fn nist() -> Self {
        Self {
            min_length: 15,
            max_length: MAX_LENGTH,
            require_upper: false,
            require_lower: false,
            require_digit: false,
            require_special: false,
            max_age: None,
            history: 0,
        }
    }

    /// The configured profile, then the config's overrides: `min_length`, `max_age` and
    /// `history` replace the profile's numbers. A `max_age` of zero means no expiry. A
    /// `min_length` above the profile's `max_length` raises `max_length` to match, so the
    /// policy stays satisfiable.
    pub fn from_config(cfg: &PasswordConfig) -> Self {
        let mut policy = match cfg.policy {
            PasswordPolicyName::Hitrust => Self::hitrust(),
            PasswordPolicyName::Nist => Self::nist(),
        };
        if let Some(min) = cfg.min_length {
            policy.min_length = usize::try_from(min).unwrap_or(usize::MAX);
            policy.max_length = policy.max_length.max(policy.min_length);
        }
        if let Some(age) = cfg.max_age {
            policy.max_age = (!age.is_zero()).then_some(age.std());
        }
        if let Some(history) = cfg.history {
            policy.history = history;
        }
        policy
    }

    /// Every violation of this policy, in this order and without stopping at the first:
    /// [`TOO_SHORT`], [`TOO_LONG`], [`MISSING_UPPERCASE`], [`MISSING_LOWERCASE`],
    /// [`MISSING_DIGIT`], [`MISSING_SPECIAL`], [`COMMON_PASSWORD`], [`CONTAINS_USERNAME`],
    /// [`CONTAINS_EMAIL`]. Empty: the password is acceptable.
    ///
    /// - Length counts Unicode scalar values (`char`s), not bytes.
    /// - Character classes are Unicode-aware: uppercase and lowercase are
    ///   `char::is_uppercase` / `char::is_lowercase`, a digit is `char::is_numeric`, and a
    ///   special character is anything that is not `char::is_alphanumeric` (so a space is
    ///   special).
    /// - `common_password`: see [`is_common`].
    /// - `contains_username`: the password contains the (trimmed) username, ignoring
    ///   case; only for usernames of at least 3 characters.
    /// - `contains_email`: the password contains the whole e-mail address or its local
    ///   part (before the last `@`), ignoring case; each only when at least 3 characters.
    pub fn check(&self, password: &str, username: &str, email: Option<&str>) -> Vec<&'static str> {
        let mut violations = Vec::new();
        let length = password.chars().count();
        if length < self.min_length {
            violations.push(TOO_SHORT);
        }
        if length > self.max_length {
            violations.push(TOO_LONG);
        }
        let rules: [CompositionRule; 4] = [
            (self.require_upper, char::is_uppercase, MISSING_UPPERCASE),
            (self.require_lower, char::is_lowercase, MISSING_LOWERCASE),
            (self.require_digit, char::is_numeric, MISSING_DIGIT),
            (self.require_special, is_special, MISSING_SPECIAL),
        ];
        for (required, class, violation) in rules {
            if required && !password.chars().any(class) {
                violations.push(violation);
            }
        }
        if is_common(password) {
            violations.push(COMMON_PASSWORD);
        }
        let lower = Zeroizing::new(password.to_lowercase());
        if contains_personal(&lower, username) {
            violations.push(CONTAINS_USERNAME);
        }
        if let Some(email) = email {
            let local = email.rsplit_once('@').map_or(email, |(local, _)| local);
            if contains_personal(&lower, email) || contains_personal(&lower, local) {
                violations.push(CONTAINS_EMAIL);
            }
        }
        violations
    }
}

/// Whether the policy requires the class, the class, and the violation when it is missing.
type CompositionRule = (bool, fn(char) -> bool, &'static str);

/// Anything that is not a letter or a digit, in any script (spaces count).
fn is_special(c: char) -> bool {
    !c.is_alphanumeric()
}

/// Whether `lower_password` (already lower-cased) contains `value`, ignoring case, when
/// `value` is long enough to mean something.
fn contains_personal(lower_password: &str, value: &str) -> bool {
    let value = value.trim().to_lowercase();
    value.chars().count() >= MIN_PERSONAL_LEN && lower_password.contains(value.as_str())
}

// ---------------------------------------------------------------------------------------
// Blocklist
// ---------------------------------------------------------------------------------------

/// The shortest base word that the trailing-suffix rule of [`is_common`] looks up.
const MIN_STRIPPED_LEN: usize = 4;

/// The blocklist: lower-cased, without `#` comment lines and blank lines.
static BLOCKLIST: LazyLock<HashSet<String>> = LazyLock::new(|| {
    include_str!("common-passwords.txt")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_lowercase)
        .collect()
});

/// Whether a password is on the common-password blocklist. Two rules, both ignoring case
/// and surrounding whitespace:
///
/// 1. the password is an entry of the list (`"QWERTY"` matches `qwerty`);
/// 2. the password with every trailing non-letter (digits, symbols, spaces) removed is an
///    entry of at least 4 characters (`"Password123!"` matches `password`).
pub fn is_common(password: &str) -> bool {
    let lower = Zeroizing::new(password.trim().to_lowercase());
    if BLOCKLIST.contains(lower.as_str()) {
        return true;
    }
    let base = lower.trim_end_matches(|c: char| !c.is_alphabetic());
    base.len() < lower.len() && base.chars().count() >= MIN_STRIPPED_LEN && BLOCKLIST.contains(base)
}

/// How many entries the blocklist has.
pub fn blocklist_len() -> usize {
    BLOCKLIST.len()
}

// ---------------------------------------------------------------------------------------
// Hashing
// ---------------------------------------------------------------------------------------

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashParams {
    /// Memory per hash, in KiB (`m`).
    pub memory_kib: u32,
    /// Passes over the memory (`t`).
    pub iterations: u32,
    /// Lanes (`p`).
    pub parallelism: u32,
}

impl HashParams {
    /// OWASP's recommended Argon2id setting: 19 MiB, 2 passes, 1 lane.
    pub const PRODUCTION: HashParams = HashParams {
        memory_kib: 19_456,
        iterations: 2,
        parallelism: 1,
    };
}

impl Default for HashParams {
    /// [`HashParams::PRODUCTION`].
    fn default() -> Self {
        Self::PRODUCTION
    }
}

/// Why hashing or verifying could not be done. No variant carries anything derived from
/// a password or a stored hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    /// Every hashing slot is taken and the waiting queue is full: answer 503 and let the
    /// client retry.
    #[error("the password hashing service is busy")]
    Busy,
    /// The hash could not be computed (the OS random source failed, or the work died).
    #[error("password hashing failed")]
    Hash,
    /// [`Hasher::new`] was given unusable settings.
    #[error("invalid password hasher settings: {0}")]
    Settings(&'static str),
}

/// The outcome of [`Hasher::verify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The password matches the stored hash.
    pub ok: bool,
    /// The password matched, but the stored hash was made with other parameters (or
    /// another Argon2 variant or version): hash the password again and store the result.
    pub needs_rehash: bool,
}

/// A stored hash asking for more than this much memory (KiB) is treated as unusable, so a
/// corrupted or planted row cannot make one login allocate gigabytes (unless the hasher's
/// own parameters ask for more).
const MAX_STORED_MEMORY_KIB: u32 = 262_144;
/// Likewise for passes.
const MAX_STORED_ITERATIONS: u32 = 16;
/// Likewise for lanes.
const MAX_STORED_PARALLELISM: u32 = 16;

/// Argon2id on a bounded blocking pool.
///
/// At most `max_concurrent` hashes run at once (on tokio's blocking threads), at most
/// `max_waiting` further callers wait for a slot, and any caller beyond that fails at once
/// with [`PasswordError::Busy`], so a login flood cannot starve the rest of the server. A
/// slot stays taken until its hash has finished, even if the caller has given up.
///
/// Cloning is cheap and clones share the pool.
#[derive(Clone)]
pub struct Hasher {
    inner: Arc<Inner>,
}

struct Inner {
    params: HashParams,
    argon2_params: Params,
    /// A hash of a random password nobody knows, verified against for unknown users.
    dummy: String,
    max_concurrent: usize,
    max_waiting: usize,
    /// Slots to run in: `max_concurrent`.
    running: Arc<Semaphore>,
    /// Callers admitted, running or waiting: `max_concurrent + max_waiting`.
    admitted: Arc<Semaphore>,
    /// The hashing threads' queue (see [`start_threads`]).
    jobs: std::sync::mpsc::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

/// `n` threads of their own for Argon2, at the lowest scheduling priority: under a
/// sign-in flood they take the CPU other requests leave, not the other way round
/// (measured in docs/performance.md). If the priority cannot be lowered they run at the
/// normal one. They end when the hasher is dropped.
fn start_threads(n: usize) -> Result<std::sync::mpsc::Sender<Job>, PasswordError> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    for i in 0..n {
        let rx = Arc::clone(&rx);
        std::thread::Builder::new()
            .name(format!("password-hash-{i}"))
            .spawn(move || {
                let _ = thread_priority::set_current_thread_priority(
                    thread_priority::ThreadPriority::Min,
                );
                loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        // A panic ends that job (its caller sees an error), not the thread.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        Err(_) => return,
                    }
                }
            })
            .map_err(|_| PasswordError::Settings("the hashing threads could not start"))?;
    }
    Ok(tx)
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("Hasher")
            .field("params", &inner.params)
            .field("max_concurrent", &inner.max_concurrent)
            .field("max_waiting", &inner.max_waiting)
            .field("free_slots", &inner.running.available_permits())
            .finish_non_exhaustive()
    }
}

impl Hasher {
    /// A hasher with these parameters and pool bounds. It hashes a random password once,
    /// here and synchronously (for [`Hasher::verify`] of unknown users), so it takes as
    /// long as one hash.
    ///
    /// Fails with [`PasswordError::Settings`] when `max_concurrent` is 0, the bounds are
    /// too large, or Argon2 rejects the parameters (e.g. `memory_kib < 8 * parallelism`).
    pub fn new(
        params: HashParams,
        max_concurrent: usize,
        max_waiting: usize,
    ) -> Result<Self, PasswordError> {
        if max_concurrent == 0 {
            return Err(PasswordError::Settings("max_concurrent must be at least 1"));
        }
        let admitted = max_concurrent
            .checked_add(max_waiting)
            .filter(|n| *n <= Semaphore::MAX_PERMITS)
            .ok_or(PasswordError::Settings(
                "max_concurrent + max_waiting is too large",
            ))?;
        let argon2_params = Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            None,
        )
        .map_err(|_| PasswordError::Settings("the Argon2 parameters are out of range"))?;
        let random_password = Zeroizing::new(try_generate_salt().map_err(|_| PasswordError::Hash)?);
        let dummy = hash_with(&argon2id(&argon2_params), random_password.as_slice())?;
        Ok(Self {
            inner: Arc::new(Inner {
                params,
                argon2_params,
                dummy,
                max_concurrent,
                max_waiting,
                running: Arc::new(Semaphore::new(max_concurrent)),
                admitted: Arc::new(Semaphore::new(admitted)),
                jobs: start_threads(max_concurrent)?,
            }),
        })
    }

    /// The parameters new hashes are made with.
    pub fn params(&self) -> &HashParams {
        &self.inner.params
    }

    /// Hashes a password with a fresh random salt from the OS, as a PHC string
    /// (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
    pub async fn hash(&self, password: &Secret) -> Result<String, PasswordError> {
        let password = password.clone();
        self.run(move |inner| hash_with(&inner.argon2(), password.expose().as_bytes()))
            .await?
    }

    /// Verifies a password against a stored PHC string.
    ///
    /// With `phc` `None` (unknown user), or a stored hash that is malformed, not Argon2 or
    /// asks for unreasonable resources, it verifies against a dummy hash made with this
    /// hasher's parameters, so the answer takes about as long, and returns `ok: false`.
    /// `needs_rehash` is true only when the password matched and the stored hash's
    /// variant, version, `m`, `t`, `p` or output length differ from this hasher's.
    pub async fn verify(
        &self,
        password: &Secret,
        phc: Option<&str>,
    ) -> Result<Verified, PasswordError> {
        let password = password.clone();
        let phc = phc.map(str::to_owned);
        self.run(move |inner| inner.verify(password.expose().as_bytes(), phc.as_deref()))
            .await
    }

    /// Whether `password` matches any of `phcs` (the password history), in one slot of the
    /// pool. Stops at the first match; unusable entries never match.
    pub async fn matches_any(
        &self,
        password: &Secret,
        phcs: &[String],
    ) -> Result<bool, PasswordError> {
        if phcs.is_empty() {
            return Ok(false);
        }
        let password = password.clone();
        let phcs = phcs.to_vec();
        self.run(move |inner| {
            let password = password.expose().as_bytes();
            phcs.iter().any(|phc| {
                inner
                    .usable(phc)
                    .is_some_and(|hash| inner.argon2().verify_password(password, &hash).is_ok())
            })
        })
        .await
    }

    /// Runs `work` on the blocking pool once a slot is free: fails at once with `Busy` when
    /// the queue is full. The slot is released when `work` returns, not when the caller
    /// stops waiting.
    async fn run<T, F>(&self, work: F) -> Result<T, PasswordError>
    where
        F: FnOnce(&Inner) -> T + Send + 'static,
        T: Send + 'static,
    {
        let admitted = Arc::clone(&self.inner.admitted)
            .try_acquire_owned()
            .map_err(|_| PasswordError::Busy)?;
        let running = Arc::clone(&self.inner.running)
            .acquire_owned()
            .await
            .map_err(|_| PasswordError::Busy)?;
        let inner = Arc::clone(&self.inner);
        let (reply, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let slot = (admitted, running);
            let out = work(&inner);
            // Free the slot before answering, so the caller finds it free.
            drop(slot);
            let _ = reply.send(out);
        });
        self.inner.jobs.send(job).map_err(|_| PasswordError::Hash)?;
        result.await.map_err(|_| PasswordError::Hash)
    }

    /// Callers running or waiting (for tests).
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        let inner = &self.inner;
        inner.max_concurrent + inner.max_waiting - inner.admitted.available_permits()
    }
}

impl Inner {
    fn argon2(&self) -> Argon2<'static> {
        argon2id(&self.argon2_params)
    }

    /// The blocking part of [`Hasher::verify`].
    fn verify(&self, password: &[u8], phc: Option<&str>) -> Verified {
        let argon2 = self.argon2();
        match phc.and_then(|phc| self.usable(phc)) {
            Some(hash) => {
                let ok = argon2.verify_password(password, &hash).is_ok();
                Verified {
                    ok,
                    needs_rehash: ok && !self.made_with_own_params(&hash),
                }
            }
            None => {
                // Same work as a real verification, result thrown away.
                if let Ok(dummy) = PasswordHash::new(&self.dummy) {
                    std::hint::black_box(argon2.verify_password(password, &dummy).is_ok());
                }
                Verified {
                    ok: false,
                    needs_rehash: false,
                }
            }
        }
    }

    /// The stored hash, parsed, if it is an Argon2 hash of a known version, with a salt
    /// and an output, within the resource caps.
    fn usable(&self, phc: &str) -> Option<PasswordHash> {
        let hash = PasswordHash::new(phc).ok()?;
        Algorithm::try_from(hash.algorithm.as_str()).ok()?;
        if let Some(version) = hash.version {
            Version::try_from(version).ok()?;
        }
        if hash.salt.is_none() || hash.hash.is_none() {
            return None;
        }
        let params = Params::try_from(&hash).ok()?;
        let own = &self.params;
        let affordable = params.m_cost() <= MAX_STORED_MEMORY_KIB.max(own.memory_kib)
            && params.t_cost() <= MAX_STORED_ITERATIONS.max(own.iterations)
            && params.p_cost() <= MAX_STORED_PARALLELISM.max(own.parallelism);
        affordable.then_some(hash)
    }

    /// Whether a stored hash was made exactly as this hasher makes new ones.
    fn made_with_own_params(&self, hash: &PasswordHash) -> bool {
        let Ok(params) = Params::try_from(hash) else {
            return false;
        };
        let own = &self.params;
        hash.algorithm == ARGON2ID_IDENT
            && hash.version == Some(Version::V0x13.into())
            && params.m_cost() == own.memory_kib
            && params.t_cost() == own.iterations
            && params.p_cost() == own.parallelism
            && params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN)
                == Params::DEFAULT_OUTPUT_LEN
    }
}

fn argon2id(params: &Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
}

/// One hash with a fresh salt from the OS, as a PHC string.
fn hash_with(argon2: &Argon2<'_>, password: &[u8]) -> Result<String, PasswordError> {
    PasswordHasher::<PasswordHash>::hash_password(argon2, password)
        .map(|hash| hash.to_string())
        .map_err(|_| PasswordError::Hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Duration;

    /// Cheap parameters so debug-build tests stay fast.
    const LIGHT: HashParams = HashParams {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    };

    fn secret(s: &str) -> Secret {
        Secret::new(s.to_owned())
    }

    fn cfg(policy: PasswordPolicyName) -> PasswordConfig {
        PasswordConfig {
            policy,
            ..PasswordConfig::default()
        }
    }

    #[test]
    fn hitrust_reports_every_violation_of_a_short_password() {
        let policy = Policy::from_config(&cfg(PasswordPolicyName::Hitrust));
        assert_eq!(policy, Policy::hitrust());
        assert_eq!(
            policy.check("short", "alice", None),
            vec![TOO_SHORT, MISSING_UPPERCASE, MISSING_DIGIT, MISSING_SPECIAL]
        );
        assert_eq!(
            policy.check("SHORT", "alice", None),
            vec![TOO_SHORT, MISSING_LOWERCASE, MISSING_DIGIT, MISSING_SPECIAL]
        );
    }

    #[test]
    fn hitrust_profile_numbers() {
        let p = Policy::hitrust();
        assert_eq!((p.min_length, p.max_length, p.history), (8, 1024, 5));
        assert!(p.require_upper && p.require_lower && p.require_digit && p.require_special);
        assert_eq!(p.max_age, Some(StdDuration::from_secs(90 * 86_400)));
        assert_eq!(Policy::default(), p);
    }

    #[test]
    fn compliant_password_passes_hitrust_but_is_too_short_for_nist() {
        let hitrust = Policy::from_config(&cfg(PasswordPolicyName::Hitrust));
        let nist = Policy::from_config(&cfg(PasswordPolicyName::Nist));
        let email = Some("alice@example.com");
        assert_eq!(
            hitrust.check("Tr0ub4dor&3x!", "alice", email),
            Vec::<&str>::new()
        );
        assert_eq!(nist.check("Tr0ub4dor&3x!", "alice", email), vec![TOO_SHORT]);
    }

    #[test]
    fn nist_accepts_a_long_lowercase_passphrase_and_has_no_composition_rules() {
        let nist = Policy::from_config(&cfg(PasswordPolicyName::Nist));
        assert_eq!(nist, Policy::nist());
        assert_eq!(
            (nist.min_length, nist.max_length, nist.history),
            (15, 1024, 0)
        );
        assert_eq!(nist.max_age, None);
        let phrase = "quiet maple harbor lamp";
        assert!(phrase.chars().count() >= 20);
        assert!(!is_common(phrase));
        assert_eq!(
            nist.check(phrase, "alice", Some("alice@example.com")),
            Vec::<&str>::new()
        );
        // No letters, digits or specials required: only length and the blocklist count.
        assert_eq!(
            nist.check("zzzzzzzzzzzzzzzzzzzz", "alice", None),
            Vec::<&str>::new()
        );
        assert_eq!(
            nist.check("58203917465820391746", "alice", None),
            Vec::<&str>::new()
        );
        // Under hitrust the space counts as the special character.
        let hitrust = Policy::hitrust();
        assert_eq!(
            hitrust.check(phrase, "alice", None),
            vec![MISSING_UPPERCASE, MISSING_DIGIT]
        );
    }

    #[test]
    fn common_passwords_are_rejected_under_both_profiles() {
        for policy in [Policy::hitrust(), Policy::nist()] {
            for pw in [
                "password",
                "Password123!",
                "qwerty",
                "letmein",
                "  LetMeIn  ",
            ] {
                assert!(is_common(pw), "{pw}");
                assert!(
                    policy.check(pw, "alice", None).contains(&COMMON_PASSWORD),
                    "{pw} under {policy:?}"
                );
            }
        }
        // The suffix rule strips trailing non-letters only.
        assert!(is_common("Monkey!!2024"));
        assert!(is_common("pass!!"));
        assert!(!is_common("Tr0ub4dor&3x!"));
        assert!(!is_common("!!password-is-not-at-the-end-xyz"));
        assert!(!is_common(""));
        assert!(!is_common("1!"));
    }

    #[test]
    fn contains_username_and_email() {
        let p = Policy::hitrust();
        let email = Some("J.Smith@Example.org");
        assert!(
            p.check("My-AlicE-2024!", "alice", None)
                .contains(&CONTAINS_USERNAME)
        );
        assert!(
            !p.check("My-AlicE-2024!", "bob", None)
                .contains(&CONTAINS_USERNAME)
        );
        // Usernames shorter than 3 characters are not looked for.
        assert!(
            !p.check("My-Al-2024-xyz!", "al", None)
                .contains(&CONTAINS_USERNAME)
        );
        // The local part, ignoring case.
        let v = p.check("Zz9!j.smithQQ", "bob", email);
        assert_eq!(v, vec![CONTAINS_EMAIL]);
        assert!(
            !p.check("Zz9!jsmithQQ", "bob", email)
                .contains(&CONTAINS_EMAIL)
        );
        // A short local part is not looked for, the whole address still is.
        assert!(
            !p.check("Zz9!jo-QQ-x", "bob", Some("jo@ex.io"))
                .contains(&CONTAINS_EMAIL)
        );
        assert!(
            p.check("Zz9!JO@EX.IO", "bob", Some("jo@ex.io"))
                .contains(&CONTAINS_EMAIL)
        );
        assert!(
            !p.check("Zz9!jsmithQQ", "bob", None)
                .contains(&CONTAINS_EMAIL)
        );
        // Both at once, in the stable order.
        let v = p.check("alice-j.smith-9Z!", "alice", email);
        assert_eq!(v, vec![CONTAINS_USERNAME, CONTAINS_EMAIL]);
    }

    #[test]
    fn config_overrides_replace_the_profile_numbers() {
        let config = PasswordConfig {
            policy: PasswordPolicyName::Hitrust,
            min_length: Some(12),
            max_age: Some(Duration::from_days(30)),
            history: Some(3),
            ..PasswordConfig::default()
        };
        let p = Policy::from_config(&config);
        assert_eq!(p.min_length, 12);
        assert_eq!(p.history, 3);
        assert_eq!(p.max_age, Some(StdDuration::from_secs(30 * 86_400)));
        assert!(p.require_special);
        assert_eq!(p.check("Tr0ub4dor&3", "alice", None), vec![TOO_SHORT]);
        assert_eq!(p.check("Tr0ub4dor&3x", "alice", None), Vec::<&str>::new());

        let nist = Policy::from_config(&PasswordConfig {
            policy: PasswordPolicyName::Nist,
            max_age: Some(Duration::from_days(365)),
            history: Some(4),
            ..PasswordConfig::default()
        });
        assert_eq!(nist.min_length, 15);
        assert_eq!(nist.max_age, Some(StdDuration::from_secs(365 * 86_400)));
        assert_eq!(nist.history, 4);

        // Zero disables expiry; a huge minimum keeps the policy satisfiable.
        let p = Policy::from_config(&PasswordConfig {
            policy: PasswordPolicyName::Hitrust,
            min_length: Some(2000),
            max_age: Some(Duration::from_secs(0)),
            ..PasswordConfig::default()
        });
        assert_eq!(p.max_age, None);
        assert_eq!(p.history, 5);
        assert_eq!((p.min_length, p.max_length), (2000, 2000));
    }

    #[test]
    fn length_counts_characters_not_bytes() {
        let emoji = "\u{1F512}\u{1F511}\u{1F6E1}\u{1F3E5}";
        assert_eq!(emoji.len(), 16);
        let four = Policy {
            min_length: 4,
            max_length: 4,
            ..Policy::nist()
        };
        assert_eq!(four.check(emoji, "alice", None), Vec::<&str>::new());
        let five = Policy {
            min_length: 5,
            ..Policy::nist()
        };
        assert_eq!(five.check(emoji, "alice", None), vec![TOO_SHORT]);
        // Emoji are neither letters nor digits: they count as special.
        assert!(
            !Policy::hitrust()
                .check(emoji, "alice", None)
                .contains(&MISSING_SPECIAL)
        );
        // Letters and digits of other scripts count as such.
        assert_eq!(
            Policy::hitrust().check("Ωmega٣ü-x", "alice", None),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn too_long_beyond_1024_characters() {
        let ok: String = "Ab1!".repeat(256);
        assert_eq!(ok.chars().count(), 1024);
        for policy in [Policy::hitrust(), Policy::nist()] {
            assert_eq!(policy.check(&ok, "alice", None), Vec::<&str>::new());
            let long = format!("{ok}x");
            assert_eq!(policy.check(&long, "alice", None), vec![TOO_LONG]);
        }
        // 1024 two-byte characters are still 1024 characters.
        let wide = format!("{}A1!", "é".repeat(1021));
        assert_eq!(
            Policy::hitrust().check(&wide, "alice", None),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn blocklist_has_at_least_10000_lower_case_entries() {
        assert!(blocklist_len() >= 10_000, "{}", blocklist_len());
        assert!(
            BLOCKLIST
                .iter()
                .all(|e| *e == e.to_lowercase() && !e.starts_with('#'))
        );
        assert!(BLOCKLIST.iter().all(|e| !e.is_empty() && e.trim() == e));
        // Sanity: the header's comment lines are not entries.
        assert!(!BLOCKLIST.iter().any(|e| e.contains("frequency_lists")));
    }

    #[tokio::test]
    async fn hash_then_verify() {
        let hasher = Hasher::new(LIGHT, 2, 8).unwrap();
        let phc = hasher.hash(&secret("correct horse")).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{phc}");
        let right = hasher
            .verify(&secret("correct horse"), Some(&phc))
            .await
            .unwrap();
        assert_eq!(
            right,
            Verified {
                ok: true,
                needs_rehash: false
            }
        );
        let wrong = hasher
            .verify(&secret("correct horsE"), Some(&phc))
            .await
            .unwrap();
        assert_eq!(
            wrong,
            Verified {
                ok: false,
                needs_rehash: false
            }
        );
        // Fresh salt each time.
        let again = hasher.hash(&secret("correct horse")).await.unwrap();
        assert_ne!(phc, again);
    }

    #[tokio::test]
    async fn verify_without_a_stored_hash_is_never_ok() {
        let hasher = Hasher::new(LIGHT, 1, 1).unwrap();
        for pw in ["", "anything", "correct horse"] {
            let v = hasher.verify(&secret(pw), None).await.unwrap();
            assert!(!v.ok && !v.needs_rehash, "{pw}");
        }
        // The dummy is a real hash with the hasher's parameters.
        assert!(
            hasher
                .inner
                .dummy
                .starts_with("$argon2id$v=19$m=1024,t=1,p=1$")
        );
    }

    #[tokio::test]
    async fn needs_rehash_when_params_differ() {
        let old = Hasher::new(LIGHT, 1, 4).unwrap();
        let new = Hasher::new(
            HashParams {
                iterations: 2,
                ..LIGHT
            },
            1,
            4,
        )
        .unwrap();
        assert_eq!(new.params().iterations, 2);
        let phc = old.hash(&secret("s3cret-pass")).await.unwrap();
        let v = new
            .verify(&secret("s3cret-pass"), Some(&phc))
            .await
            .unwrap();
        assert_eq!(
            v,
            Verified {
                ok: true,
                needs_rehash: true
            }
        );
        let v = new.verify(&secret("wrong"), Some(&phc)).await.unwrap();
        assert_eq!(
            v,
            Verified {
                ok: false,
                needs_rehash: false
            }
        );
        let v = old
            .verify(&secret("s3cret-pass"), Some(&phc))
            .await
            .unwrap();
        assert!(v.ok && !v.needs_rehash);

        // Another Argon2 variant with the same numbers also wants a rehash.
        let argon2i = Argon2::new(
            Algorithm::Argon2i,
            Version::V0x13,
            old.inner.argon2_params.clone(),
        );
        let phc_i = hash_with(&argon2i, b"s3cret-pass").unwrap();
        assert!(phc_i.starts_with("$argon2i$"));
        let v = old
            .verify(&secret("s3cret-pass"), Some(&phc_i))
            .await
            .unwrap();
        assert_eq!(
            v,
            Verified {
                ok: true,
                needs_rehash: true
            }
        );
    }

    #[tokio::test]
    async fn malformed_stored_hashes_are_not_ok() {
        let hasher = Hasher::new(LIGHT, 1, 1).unwrap();
        let good = hasher.hash(&secret("pw")).await.unwrap();
        let truncated = good.get(..good.len() - 10).unwrap().to_owned();
        let bad = [
            "",
            "not a hash",
            "$argon2id$v=19$m=1024,t=1,p=1$",
            "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ",
            "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
            "$argon2id$v=19$m=4294967295,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=1024,t=4000000,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=99$m=1024,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            truncated.as_str(),
        ];
        for phc in bad {
            let v = hasher.verify(&secret("pw"), Some(phc)).await.unwrap();
            assert_eq!(
                v,
                Verified {
                    ok: false,
                    needs_rehash: false
                },
                "{phc}"
            );
        }
        assert!(hasher.verify(&secret("pw"), Some(&good)).await.unwrap().ok);
    }

    #[tokio::test]
    async fn matches_any_checks_the_history() {
        let hasher = Hasher::new(LIGHT, 1, 1).unwrap();
        let history = vec![
            "garbage".to_owned(),
            hasher.hash(&secret("first-Pass1!")).await.unwrap(),
            hasher.hash(&secret("second-Pass2!")).await.unwrap(),
        ];
        assert!(
            hasher
                .matches_any(&secret("second-Pass2!"), &history)
                .await
                .unwrap()
        );
        assert!(
            hasher
                .matches_any(&secret("first-Pass1!"), &history)
                .await
                .unwrap()
        );
        assert!(
            !hasher
                .matches_any(&secret("third-Pass3!"), &history)
                .await
                .unwrap()
        );
        assert!(
            !hasher
                .matches_any(&secret("first-Pass1!"), &[])
                .await
                .unwrap()
        );
    }

    /// The outcome of a call that must answer at once (waiting would mean it queued).
    async fn at_once<T>(call: impl Future<Output = T>) -> T {
        tokio::time::timeout(StdDuration::from_secs(10), call)
            .await
            .expect("the call waited instead of answering at once")
    }

    /// Holds the only slot with work that waits for the test's signal.
    async fn occupy(hasher: &Hasher) -> (tokio::task::JoinHandle<()>, std::sync::mpsc::Sender<()>) {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let h = hasher.clone();
        let task = tokio::spawn(async move {
            h.run(move |_| {
                let _ = wait.recv();
            })
            .await
            .unwrap();
        });
        while hasher.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        (task, release)
    }

    #[tokio::test]
    async fn busy_when_max_waiting_is_exceeded() {
        let hasher = Hasher::new(LIGHT, 1, 0).unwrap();
        let (task, release) = occupy(&hasher).await;
        let err = at_once(hasher.hash(&secret("pw"))).await.unwrap_err();
        assert_eq!(err, PasswordError::Busy);
        assert_eq!(
            at_once(hasher.verify(&secret("pw"), None)).await,
            Err(PasswordError::Busy)
        );
        release.send(()).unwrap();
        task.await.unwrap();
        // The slot is free again.
        assert!(hasher.hash(&secret("pw")).await.is_ok());
        assert_eq!(hasher.in_flight(), 0);
    }

    #[tokio::test]
    async fn callers_wait_up_to_max_waiting() {
        let hasher = Hasher::new(LIGHT, 1, 1).unwrap();
        let (task, release) = occupy(&hasher).await;
        let h = hasher.clone();
        let waiting = tokio::spawn(async move { h.hash(&secret("pw")).await });
        while hasher.in_flight() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            at_once(hasher.hash(&secret("pw"))).await,
            Err(PasswordError::Busy)
        );
        assert!(!waiting.is_finished());
        release.send(()).unwrap();
        task.await.unwrap();
        let phc = waiting.await.unwrap().unwrap();
        assert!(hasher.verify(&secret("pw"), Some(&phc)).await.unwrap().ok);
    }

    #[tokio::test]
    async fn busy_while_a_real_hash_holds_the_only_slot() {
        // Slow enough (well over 10 ms in debug builds) that the second call lands while
        // the first hash runs.
        let slow = HashParams {
            memory_kib: 8192,
            iterations: 3,
            parallelism: 1,
        };
        let hasher = Hasher::new(slow, 1, 0).unwrap();
        let h = hasher.clone();
        let first = tokio::spawn(async move { h.hash(&secret("first")).await });
        while hasher.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            at_once(hasher.hash(&secret("second"))).await,
            Err(PasswordError::Busy)
        );
        assert!(first.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn production_params_produce_the_owasp_phc_string() {
        assert_eq!(HashParams::default(), HashParams::PRODUCTION);
        // One hash: the dummy made by `new` goes through the same code as `hash`.
        let hasher = Hasher::new(HashParams::PRODUCTION, 1, 0).unwrap();
        let dummy = &hasher.inner.dummy;
        assert!(
            dummy.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{dummy}"
        );
        assert!(PasswordHash::new(dummy).is_ok());
    }

    #[test]
    fn new_rejects_unusable_settings() {
        assert!(matches!(
            Hasher::new(LIGHT, 0, 4),
            Err(PasswordError::Settings(_))
        ));
        assert!(matches!(
            Hasher::new(LIGHT, usize::MAX, 1),
            Err(PasswordError::Settings(_))
        ));
        let tiny = HashParams {
            memory_kib: 4,
            ..LIGHT
        };
        assert!(matches!(
            Hasher::new(tiny, 1, 1),
            Err(PasswordError::Settings(_))
        ));
    }

    #[tokio::test]
    async fn nothing_prints_the_password() {
        let canary = "Canary-7f3e-Pa55w0rd!";
        let hasher = Hasher::new(LIGHT, 1, 0).unwrap();
        let phc = hasher.hash(&secret(canary)).await.unwrap();
        assert!(!phc.contains(canary));
        let verified = hasher.verify(&secret(canary), Some(&phc)).await.unwrap();
        assert!(verified.ok);
        let (task, release) = occupy(&hasher).await;
        let busy = at_once(hasher.hash(&secret(canary))).await.unwrap_err();
        release.send(()).unwrap();
        task.await.unwrap();
        let printed = [
            format!("{hasher:?}"),
            format!("{verified:?}"),
            format!("{busy:?} {busy}"),
            format!("{:?} {}", PasswordError::Hash, PasswordError::Hash),
            format!("{:?}", PasswordError::Settings("x")),
            format!("{:?}", secret(canary)),
        ];
        for text in printed {
            assert!(!text.contains(canary), "{text}");
            assert!(!text.contains("Canary"), "{text}");
        }
    }
}
