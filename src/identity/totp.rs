//! Time-based one-time passwords (TOTP, RFC 6238) and recovery codes for second-factor login.
//!
//! The choices, and why:
//!
//! - **HMAC-SHA1, 6 digits, 30-second steps.** These are the RFC 6238 defaults and the only
//!   parameters every authenticator app (Google Authenticator included) honours; SHA-1 is still
//!   sound inside HMAC, which is why `ring` offers it as `HMAC_SHA1_FOR_LEGACY_USE_ONLY`.
//! - **160-bit secrets** from the OS CSPRNG, as RFC 4226 section 4 recommends (128 bits is its
//!   minimum, which is the shortest secret we accept on import).
//! - **Window: the current step and the previous one, never the next.** RFC 6238 section 5.2
//!   lets the server accept codes from nearby steps to absorb clock drift and typing delay; the
//!   product rule is to allow one step of lateness and no earliness, so a code is usable for
//!   between 30 and 60 seconds.
//! - **One use per code.** RFC 6238 section 5.2 says a verifier must not accept the second use
//!   of a code: [`verify`] only accepts a step greater than the last one used, and returns the
//!   matched step for the caller to store.
//! - **Constant-time comparison** of the typed code, so timing tells an attacker nothing about
//!   how many digits were right.
//!
//! Secrets are zeroized when dropped and are never printed: [`TotpSecret`]'s `Debug` shows
//! `[REDACTED]` and it has no `Display`.

use std::fmt;

use data_encoding::BASE32_NOPAD;
use qrcode::render::svg;
use qrcode::{EcLevel, QrCode};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Number of digits in a code (RFC 6238 default, what authenticator apps show).
pub const DIGITS: u32 = 6;

/// Length of a time step in seconds (RFC 6238 recommended default).
pub const STEP_SECONDS: i64 = 30;

/// Length of a generated secret: 160 bits, the RFC 4226 recommendation.
const GENERATED_SECRET_LEN: usize = 20;

/// Shortest secret accepted: 128 bits, the RFC 4226 minimum.
const MIN_SECRET_LEN: usize = 16;

/// Longest secret accepted (the size of the RFC 6238 SHA-512 test key).
const MAX_SECRET_LEN: usize = 64;

/// How many recovery codes [`recovery_codes`] returns.
const RECOVERY_CODE_COUNT: usize = 10;

/// Random bytes per recovery code: 80 bits, which is 16 base32 characters.
const RECOVERY_CODE_BYTES: usize = 10;

/// Characters per recovery code, not counting the dashes.
const RECOVERY_CODE_LEN: usize = 16;

/// Crockford's base32 alphabet: digits and upper-case letters without I, L, O and U.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Errors of this module. The messages never contain secret material.
#[derive(Debug, thiserror::Error)]
pub enum TotpError {
    /// The OS random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// A secret had the wrong length or was not valid base32.
    #[error("the TOTP secret is malformed")]
    BadSecret,
    /// The data could not be encoded as a QR code (for example, it is too long).
    #[error("the data cannot be encoded as a QR code")]
    Qr,
}

/// A TOTP secret: 160 bits (20 bytes) from the OS CSPRNG when generated, 16 to 64 bytes when
/// imported. Zeroized on drop; `Debug` shows `[REDACTED]`; there is no `Display`, `Clone` or
/// `PartialEq` (compare secrets with [`TotpSecret::bytes`] and a constant-time comparison).
pub struct TotpSecret(Zeroizing<Vec<u8>>);

impl TotpSecret {
    /// Generates a new 20-byte secret from the OS CSPRNG (`ring::rand::SystemRandom`).
    pub fn generate() -> Result<Self, TotpError> {
        let mut bytes = Zeroizing::new(vec![0_u8; GENERATED_SECRET_LEN]);
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| TotpError::Random)?;
        Self::from_vec(bytes)
    }

    /// Makes a secret from raw bytes; 16 to 64 bytes are accepted (the 20-byte ASCII
    /// "12345678901234567890" of the RFC test vectors included).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TotpError> {
        Self::from_vec(Zeroizing::new(bytes.to_vec()))
    }

    /// The raw secret bytes, the HMAC key.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The secret as RFC 4648 base32, upper case and without padding, which is what
    /// authenticator apps expect in an `otpauth://` URI or for manual entry.
    pub fn to_base32(&self) -> String {
        BASE32_NOPAD.encode(&self.0)
    }

    /// Parses a base32 secret as a user may type or paste it: lower case, spaces (and other
    /// white space) and trailing `=` padding are all accepted.
    pub fn from_base32(s: &str) -> Result<Self, TotpError> {
        let cleaned: Zeroizing<String> = Zeroizing::new(
            s.chars()
                .filter(|c| !c.is_whitespace())
                .map(|c| c.to_ascii_uppercase())
                .collect(),
        );
        let unpadded = cleaned.trim_end_matches('=');
        // Decode into a buffer that is zeroized on drop, also when decoding fails halfway.
        let len = BASE32_NOPAD
            .decode_len(unpadded.len())
            .map_err(|_| TotpError::BadSecret)?;
        let mut bytes = Zeroizing::new(vec![0_u8; len]);
        let written = BASE32_NOPAD
            .decode_mut(unpadded.as_bytes(), &mut bytes)
            .map_err(|_| TotpError::BadSecret)?;
        bytes.truncate(written);
        Self::from_vec(bytes)
    }

    /// Takes ownership of the bytes after checking their length.
    fn from_vec(bytes: Zeroizing<Vec<u8>>) -> Result<Self, TotpError> {
        if (MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&bytes.len()) {
            Ok(Self(bytes))
        } else {
            Err(TotpError::BadSecret)
        }
    }
}

impl fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TotpSecret([REDACTED])")
    }
}

/// The time step of a Unix time: `floor(t / 30)` (RFC 6238 with T0 = 0). Times before 1970
/// give step 0.
pub fn step_at(unix_seconds: i64) -> u64 {
    u64::try_from(unix_seconds.div_euclid(STEP_SECONDS)).unwrap_or(0)
}

/// The 6-digit code of a time step, as a zero-padded string: RFC 4226 HOTP (HMAC-SHA1 over the
/// step as a big-endian 64-bit counter, then dynamic truncation), which is what RFC 6238 uses.
pub fn code_at(secret: &TotpSecret, step: u64) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.bytes());
    let tag = hmac::sign(&key, &step.to_be_bytes());
    let code = dynamic_truncation(tag.as_ref()) % 10_u32.pow(DIGITS);
    format!("{code:0width$}", width = DIGITS as usize)
}

/// RFC 4226 section 5.3: the low 4 bits of the last byte pick an offset; the 31 low bits of
/// the 4 bytes at that offset are the result.
fn dynamic_truncation(mac: &[u8]) -> u32 {
    let offset = usize::from(mac.last().copied().unwrap_or(0) & 0x0f);
    // An HMAC-SHA1 tag has 20 bytes and the offset is at most 15, so the 4 bytes are always
    // there; the fallback only keeps this function free of any panicking path.
    let word: [u8; 4] = mac
        .get(offset..offset + 4)
        .and_then(|bytes| bytes.try_into().ok())
        .unwrap_or([0; 4]);
    u32::from_be_bytes(word) & 0x7fff_ffff
}

/// Checks a code typed by a user at `unix_seconds`.
///
/// The code is accepted for the current step and the previous one only (not the next: the
/// product allows lateness, never earliness), and only if that step is greater than
/// `last_used_step`, so each code works once and replay is refused. Comparisons are in constant
/// time, and every candidate step is compared even after a match. Returns the matched step
/// (the later one if both match), which the caller must store as the new last used step.
///
/// The input is trimmed and spaces inside are removed ("123 456" is fine); anything that is
/// not then exactly 6 ASCII digits is refused.
pub fn verify(
    secret: &TotpSecret,
    code: &str,
    unix_seconds: i64,
    last_used_step: Option<u64>,
) -> Option<u64> {
    let typed = normalize_code(code)?;
    let current = step_at(unix_seconds);
    let candidates = [current.checked_sub(1), Some(current)];
    let mut matched = None;
    for step in candidates.into_iter().flatten() {
        if last_used_step.is_some_and(|last| step <= last) {
            continue;
        }
        let expected = code_at(secret, step);
        if bool::from(expected.as_bytes().ct_eq(typed.as_bytes())) {
            matched = Some(step);
        }
    }
    matched
}

/// Trims the typed code and removes inner spaces; `None` unless exactly [`DIGITS`] ASCII
/// digits remain.
fn normalize_code(code: &str) -> Option<String> {
    let digits: String = code.trim().chars().filter(|&c| c != ' ').collect();
    let well_formed = digits.len() == DIGITS as usize && digits.bytes().all(|b| b.is_ascii_digit());
    well_formed.then_some(digits)
}

/// The key URI that authenticator apps (Google Authenticator included) read from a QR code:
/// `otpauth://totp/{issuer}:{account}?secret=...&issuer=...&algorithm=SHA1&digits=6&period=30`.
///
/// Issuer and account are percent-encoded: RFC 3986 unreserved characters are kept, every other
/// byte of their UTF-8 becomes `%XX` (so a space is `%20`, `@` is `%40` and a `:` inside either
/// part is `%3A`, leaving the one literal `:` as the label separator).
pub fn otpauth_uri(secret: &TotpSecret, issuer: &str, account: &str) -> String {
    let issuer = percent_encode(issuer);
    let account = percent_encode(account);
    format!(
        "otpauth://totp/{issuer}:{account}?secret={}&issuer={issuer}&algorithm=SHA1\
         &digits={DIGITS}&period={STEP_SECONDS}",
        secret.to_base32()
    )
}

/// Percent-encodes everything but RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The QR code of a URI as a standalone SVG document: error-correction level M, with a quiet
/// zone, dark `#000000` modules on a light `#ffffff` background, at least 200x200.
///
/// The document is a rectangle and one path; it has no script, no style element and no
/// external reference, and the URI itself does not appear in it (only the QR modules do).
pub fn qr_svg(uri: &str) -> Result<String, TotpError> {
    let code = QrCode::with_error_correction_level(uri, EcLevel::M).map_err(|_| TotpError::Qr)?;
    Ok(code
        .render::<svg::Color<'_>>()
        .quiet_zone(true)
        .min_dimensions(200, 200)
        .dark_color(svg::Color("#000000"))
        .light_color(svg::Color("#ffffff"))
        .build())
}

/// Ten recovery codes from the OS CSPRNG. Each is 80 random bits written as 16 characters of
/// Crockford base32 (`0123456789ABCDEFGHJKMNPQRSTVWXYZ`), shown in groups of four:
/// `"ABCD-EFGH-JKMN-PQRS"`. Store them the way [`normalize_recovery_code`] normalises them.
pub fn recovery_codes() -> Result<Vec<String>, TotpError> {
    let rng = SystemRandom::new();
    let mut codes = Vec::with_capacity(RECOVERY_CODE_COUNT);
    for _ in 0..RECOVERY_CODE_COUNT {
        let mut bytes = Zeroizing::new([0_u8; RECOVERY_CODE_BYTES]);
        rng.fill(bytes.as_mut()).map_err(|_| TotpError::Random)?;
        codes.push(crockford_grouped(&bytes));
    }
    Ok(codes)
}

/// Writes 80 bits as 16 Crockford base32 characters, most significant first, with a dash
/// after every fourth character.
fn crockford_grouped(bytes: &[u8; RECOVERY_CODE_BYTES]) -> String {
    let value = bytes
        .iter()
        .fold(0_u128, |acc, &byte| (acc << 8) | u128::from(byte));
    let mut out = String::with_capacity(RECOVERY_CODE_LEN + 3);
    for i in 0..RECOVERY_CODE_LEN {
        if i > 0 && i % 4 == 0 {
            out.push('-');
        }
        let shift = 5 * (RECOVERY_CODE_LEN - 1 - i);
        // Masked to 5 bits, so the index is always below 32, the length of the alphabet.
        let symbol = ((value >> shift) & 0x1f) as usize;
        out.push(char::from(CROCKFORD[symbol]));
    }
    out
}

/// Normalises a typed recovery code before it is compared or hashed: ASCII upper case, spaces
/// and dashes removed, Crockford look-alikes mapped (`O` to `0`, `I` and `L` to `1`). Returns
/// `None` unless exactly 16 characters of the alphabet remain.
pub fn normalize_recovery_code(s: &str) -> Option<String> {
    let normalized: String = s
        .chars()
        .filter(|&c| !c.is_whitespace() && c != '-')
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        })
        .collect();
    let well_formed =
        normalized.len() == RECOVERY_CODE_LEN && normalized.bytes().all(|b| CROCKFORD.contains(&b));
    well_formed.then_some(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::process::Command;

    /// The RFC 4226 / RFC 6238 SHA-1 test key.
    const RFC_SECRET: &[u8] = b"12345678901234567890";

    fn rfc_secret() -> TotpSecret {
        TotpSecret::from_bytes(RFC_SECRET).unwrap()
    }

    #[test]
    fn rfc6238_sha1_test_vectors() {
        // RFC 6238 Appendix B, the last 6 of the 8 digits given there.
        let vectors = [
            (59, "287082"),
            (1_111_111_109, "081804"),
            (1_111_111_111, "050471"),
            (1_234_567_890, "005924"),
            (2_000_000_000, "279037"),
            (20_000_000_000, "353130"),
        ];
        let secret = rfc_secret();
        for (time, expected) in vectors {
            assert_eq!(code_at(&secret, step_at(time)), expected, "time {time}");
        }
    }

    #[test]
    fn rfc4226_hotp_test_vectors() {
        // RFC 4226 Appendix D, counters 0 to 9.
        let expected = [
            "755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583",
            "399871", "520489",
        ];
        let secret = rfc_secret();
        for (counter, code) in (0_u64..).zip(expected) {
            assert_eq!(code_at(&secret, counter), code, "counter {counter}");
        }
    }

    #[test]
    fn step_at_floors_and_saturates() {
        assert_eq!(step_at(0), 0);
        assert_eq!(step_at(29), 0);
        assert_eq!(step_at(30), 1);
        assert_eq!(step_at(59), 1);
        assert_eq!(step_at(60), 2);
        assert_eq!(step_at(-1), 0);
        assert_eq!(step_at(i64::MIN), 0);
        assert_eq!(step_at(i64::MAX), (i64::MAX / 30) as u64);
    }

    // With the RFC key, step 3 is "969429", step 4 "338314", step 5 "254676", step 6 "287922".
    // Time 160 is inside step 5 (150..180).

    #[test]
    fn verify_accepts_current_step() {
        assert_eq!(verify(&rfc_secret(), "254676", 160, None), Some(5));
        assert_eq!(verify(&rfc_secret(), "254676", 150, Some(4)), Some(5));
    }

    #[test]
    fn verify_accepts_previous_step() {
        assert_eq!(verify(&rfc_secret(), "338314", 160, None), Some(4));
        assert_eq!(verify(&rfc_secret(), "338314", 179, Some(3)), Some(4));
    }

    #[test]
    fn verify_refuses_two_steps_old() {
        assert_eq!(verify(&rfc_secret(), "969429", 160, None), None);
        // Boundary: still the previous step at 149, two steps old at 150.
        assert_eq!(verify(&rfc_secret(), "969429", 149, None), Some(3));
        assert_eq!(verify(&rfc_secret(), "969429", 150, None), None);
    }

    #[test]
    fn verify_refuses_next_step() {
        assert_eq!(verify(&rfc_secret(), "287922", 160, None), None);
        assert_eq!(verify(&rfc_secret(), "287922", 179, None), None);
    }

    #[test]
    fn verify_refuses_replay() {
        let secret = rfc_secret();
        let used = verify(&secret, "254676", 160, None);
        assert_eq!(used, Some(5));
        assert_eq!(verify(&secret, "254676", 160, used), None);
        assert_eq!(verify(&secret, "254676", 185, used), None);
        // Once step 5 is used, the older step-4 code is refused too.
        assert_eq!(verify(&secret, "338314", 160, used), None);
    }

    #[test]
    fn verify_accepts_a_later_code_after_a_used_one() {
        let secret = rfc_secret();
        let used = verify(&secret, "338314", 160, None);
        assert_eq!(used, Some(4));
        assert_eq!(verify(&secret, "254676", 170, used), Some(5));
    }

    #[test]
    fn verify_refuses_wrong_code() {
        let secret = rfc_secret();
        assert_eq!(verify(&secret, "000000", 160, None), None);
        assert_eq!(verify(&secret, "254677", 160, None), None);
        // A code from another secret.
        let other = TotpSecret::from_bytes(b"abcdefghijklmnopqrst").unwrap();
        assert_ne!(code_at(&other, 5), "254676");
        assert_eq!(verify(&other, "254676", 160, None), None);
    }

    #[test]
    fn verify_accepts_spaced_forms() {
        let secret = rfc_secret();
        for typed in ["254676 ", " 254676", "\t254676\n", "254 676", " 25 46 76 "] {
            assert_eq!(verify(&secret, typed, 160, None), Some(5), "{typed:?}");
        }
    }

    #[test]
    fn verify_refuses_malformed_codes() {
        let secret = rfc_secret();
        let malformed = [
            "",
            "      ",
            "25467",
            "2546760",
            "0254676",
            "25467a",
            "254-676",
            "+254676",
            "254\t676",
            "２５４６７６", // full-width digits
            "٢٥٤٦٧٦",       // Arabic-Indic digits
        ];
        for typed in malformed {
            assert_eq!(verify(&secret, typed, 160, None), None, "{typed:?}");
        }
    }

    #[test]
    fn verify_before_1970_has_no_previous_step() {
        let secret = rfc_secret();
        assert_eq!(verify(&secret, "755224", -100, None), Some(0));
        assert_eq!(verify(&secret, "755224", 10, Some(0)), None);
    }

    /// Asks oathtool for the TOTP code of a base32 secret at a Unix time (`-N @SECONDS` is GNU
    /// date syntax for a Unix time, UTC by definition); `None` if oathtool cannot be run.
    fn oathtool_totp(base32: &str, unix_seconds: i64) -> Option<String> {
        let output = Command::new("oathtool")
            .args(["--totp", "-b", base32, "-N", &format!("@{unix_seconds}")])
            .output()
            .ok()?;
        assert!(output.status.success(), "oathtool failed: {output:?}");
        Some(String::from_utf8(output.stdout).unwrap().trim().to_owned())
    }

    #[test]
    fn cross_check_with_oathtool() {
        let installed = Command::new("oathtool").arg("--version").output().is_ok();
        if !installed {
            if std::env::var("TEST_REQUIRE_OATHTOOL").as_deref() == Ok("1") {
                panic!("oathtool is required (TEST_REQUIRE_OATHTOOL=1) but not installed");
            }
            eprintln!("skipped: oathtool not installed");
            return;
        }
        let rng = SystemRandom::new();
        let mut times = vec![0, 29, 30, 59, 1_234_567_890, 20_000_000_000];
        for _ in 0..6 {
            let mut random = [0_u8; 4];
            rng.fill(&mut random).unwrap();
            times.push(i64::from(u32::from_be_bytes(random)));
        }
        for time in times {
            let secret = TotpSecret::generate().unwrap();
            let base32 = secret.to_base32();
            let theirs = oathtool_totp(&base32, time).unwrap();
            assert_eq!(code_at(&secret, step_at(time)), theirs, "time {time}");
        }
        // And the RFC key, whose answer is known.
        let theirs = oathtool_totp(&rfc_secret().to_base32(), 1_234_567_890).unwrap();
        assert_eq!(theirs, "005924");
    }

    #[test]
    fn base32_round_trip() {
        assert_eq!(rfc_secret().to_base32(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        let secret = TotpSecret::generate().unwrap();
        let base32 = secret.to_base32();
        assert_eq!(base32.len(), 32);
        assert!(!base32.contains('='));
        assert_eq!(base32, base32.to_ascii_uppercase());
        let back = TotpSecret::from_base32(&base32).unwrap();
        assert_eq!(back.bytes(), secret.bytes());
    }

    #[test]
    fn from_base32_is_tolerant() {
        let forms = [
            "gezdgnbvgy3tqojqgezdgnbvgy3tqojq",
            "GEZD GNBV GY3T QOJQ GEZD GNBV GY3T QOJQ",
            "  gezd gnbv gy3t qojq gezd gnbv gy3t qojq\n",
        ];
        for form in forms {
            assert_eq!(
                TotpSecret::from_base32(form).unwrap().bytes(),
                RFC_SECRET,
                "{form}"
            );
        }
        // A 16-byte secret needs padding in padded base32.
        let short = TotpSecret::from_bytes(b"0123456789abcdef").unwrap();
        let padded = format!("{}======", short.to_base32().to_lowercase());
        assert_eq!(padded.len(), 32);
        assert_eq!(
            TotpSecret::from_base32(&padded).unwrap().bytes(),
            short.bytes()
        );
    }

    #[test]
    fn from_base32_refuses_bad_input() {
        for bad in [
            "",
            "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJ!",
            "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJ1", // 1 is not in the RFC 4648 alphabet
            "GEZD=GNBVGY3TQOJQGEZDGNBVGY3TQOJQ",
            "GEZDGNBVGY3TQOJQ", // 10 bytes, too short
        ] {
            assert!(
                matches!(TotpSecret::from_base32(bad), Err(TotpError::BadSecret)),
                "{bad}"
            );
        }
    }

    #[test]
    fn from_bytes_checks_length() {
        assert!(TotpSecret::from_bytes(&[7; 15]).is_err());
        assert!(TotpSecret::from_bytes(&[7; 16]).is_ok());
        assert!(TotpSecret::from_bytes(&[7; 64]).is_ok());
        assert!(TotpSecret::from_bytes(&[7; 65]).is_err());
        assert!(TotpSecret::from_bytes(&[]).is_err());
    }

    #[test]
    fn generated_secrets_are_20_random_bytes() {
        let a = TotpSecret::generate().unwrap();
        let b = TotpSecret::generate().unwrap();
        assert_eq!(a.bytes().len(), 20);
        assert_eq!(b.bytes().len(), 20);
        assert_ne!(a.bytes(), b.bytes());
    }

    #[test]
    fn debug_redacts_the_secret() {
        let secret = rfc_secret();
        let debug = format!("{secret:?}");
        assert_eq!(debug, "TotpSecret([REDACTED])");
        assert!(!debug.contains(&secret.to_base32()));
        assert!(!debug.contains("12345678901234567890"));
        assert!(!debug.contains(&format!("{:?}", secret.bytes())));
        let pretty = format!("{secret:#?}");
        assert!(!pretty.contains("49, 50"));
    }

    #[test]
    fn error_messages_contain_no_secret() {
        let err = TotpSecret::from_base32("gezdgnbvgy3tqojqgezdgnbvgy3tqoj!").unwrap_err();
        let text = format!("{err} {err:?}").to_lowercase();
        assert!(!text.contains("gezd"));
    }

    #[test]
    fn otpauth_uri_is_exact() {
        let uri = otpauth_uri(&rfc_secret(), "Custodian", "dr who@example.org");
        assert_eq!(
            uri,
            "otpauth://totp/Custodian:dr%20who%40example.org\
             ?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Custodian\
             &algorithm=SHA1&digits=6&period=30"
        );
    }

    #[test]
    fn otpauth_uri_encodes_label_separators_and_reserved_characters() {
        let uri = otpauth_uri(&rfc_secret(), "St. Mary's: A&E", "a:b=c?d/e#f~g-h_i é");
        assert_eq!(
            uri,
            "otpauth://totp/St.%20Mary%27s%3A%20A%26E:a%3Ab%3Dc%3Fd%2Fe%23f~g-h_i%20%C3%A9\
             ?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=St.%20Mary%27s%3A%20A%26E\
             &algorithm=SHA1&digits=6&period=30"
        );
        assert_eq!(uri.matches(':').count(), 2); // "otpauth:" and the label separator
    }

    #[test]
    fn qr_svg_is_a_plain_deterministic_svg() {
        let uri = otpauth_uri(&rfc_secret(), "Custodian", "dr who@example.org");
        let svg = qr_svg(&uri).unwrap();
        assert!(svg.starts_with("<?xml") || svg.starts_with("<svg"));
        assert!(svg.contains("<svg"));
        assert!(svg.ends_with("</svg>"));
        let lower = svg.to_lowercase();
        for forbidden in [
            "<script",
            "<style",
            "href",
            "url(",
            "<image",
            "<foreignobject",
        ] {
            assert!(!lower.contains(forbidden), "{forbidden}");
        }
        assert!(svg.contains(r##"fill="#000000""##));
        assert!(svg.contains(r##"fill="#ffffff""##));
        assert!(
            !svg.contains("GEZDGNBV"),
            "the secret must not appear as text"
        );
        assert_eq!(qr_svg(&uri).unwrap(), svg);
        assert_ne!(qr_svg("otpauth://totp/other").unwrap(), svg);
    }

    #[test]
    fn qr_svg_is_at_least_200_pixels() {
        let svg = qr_svg("x").unwrap();
        let width: u32 = svg
            .split(r#" width=""#)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!(width >= 200, "width {width}");
    }

    #[test]
    fn qr_svg_refuses_too_long_data() {
        let huge = "A".repeat(10_000);
        assert!(matches!(qr_svg(&huge), Err(TotpError::Qr)));
    }

    fn is_grouped_recovery_code(code: &str) -> bool {
        let groups: Vec<&str> = code.split('-').collect();
        groups.len() == 4
            && groups
                .iter()
                .all(|g| g.len() == 4 && g.bytes().all(|b| CROCKFORD.contains(&b)))
    }

    #[test]
    fn recovery_codes_are_ten_distinct_grouped_crockford_codes() {
        let codes = recovery_codes().unwrap();
        assert_eq!(codes.len(), 10);
        for code in &codes {
            assert_eq!(code.len(), 19, "{code}");
            assert!(is_grouped_recovery_code(code), "{code}");
            for excluded in ['I', 'L', 'O', 'U'] {
                assert!(!code.contains(excluded), "{code}");
            }
            let plain = code.replace('-', "");
            assert_eq!(
                normalize_recovery_code(code).as_deref(),
                Some(plain.as_str())
            );
        }
        let distinct: HashSet<&String> = codes.iter().collect();
        assert_eq!(distinct.len(), 10);
        assert_ne!(recovery_codes().unwrap(), codes);
    }

    #[test]
    fn crockford_encoding_is_most_significant_first() {
        assert_eq!(crockford_grouped(&[0; 10]), "0000-0000-0000-0000");
        assert_eq!(crockford_grouped(&[0xff; 10]), "ZZZZ-ZZZZ-ZZZZ-ZZZZ");
        assert_eq!(
            crockford_grouped(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            "0000-0000-0000-0001"
        );
        // 0x08 as the top byte is 00001 000..., so the first symbol is 1.
        assert_eq!(
            crockford_grouped(&[0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            "1000-0000-0000-0000"
        );
    }

    #[test]
    fn normalize_recovery_code_cases() {
        assert_eq!(
            normalize_recovery_code("abcd efgh-jkmn-pqrs").as_deref(),
            Some("ABCDEFGHJKMNPQRS")
        );
        assert_eq!(
            normalize_recovery_code("oooo-0000-1111-2222").as_deref(),
            Some("0000000011112222")
        );
        assert_eq!(
            normalize_recovery_code("IiLl-0000-0000-0000").as_deref(),
            Some("1111000000000000")
        );
        assert_eq!(
            normalize_recovery_code(" ABCD-EFGH-JKMN-PQRS \n").as_deref(),
            Some("ABCDEFGHJKMNPQRS")
        );
        // Wrong lengths.
        assert_eq!(normalize_recovery_code(""), None);
        assert_eq!(normalize_recovery_code("ABCD-EFGH-JKMN-PQR"), None);
        assert_eq!(normalize_recovery_code("ABCD-EFGH-JKMN-PQRST"), None);
        // Characters outside the alphabet (U, punctuation, non-ASCII look-alikes).
        assert_eq!(normalize_recovery_code("ABCD-EFGH-JKMN-PQRU"), None);
        assert_eq!(normalize_recovery_code("ABCD-EFGH-JKMN-PQR!"), None);
        assert_eq!(normalize_recovery_code("ABCD-EFGH-JKMN-PQRı"), None);
    }
}
