//! A software WebAuthn authenticator ("soft passkey") for the integration tests: ES256
//! credentials, "none" attestation, and knobs for attack tests (wrong origin / rp id, UV off,
//! counter and backup flags, cloning). Speaks webauthn-rs's JSON serialisation.
#![allow(dead_code)] // parts are used only by future server tests

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};

/// A software authenticator holding any number of credentials.
#[derive(Clone, Debug)]
pub struct SoftKey {
    /// Origin written into clientDataJSON.
    pub origin: String,
    /// Rp id used when the options carry none (defaults to the origin's host).
    pub rp_id: String,
    pub credentials: Vec<Cred>,
    /// Backup flags (BE, BS) given to newly registered credentials.
    pub new_backup_eligible: bool,
    pub new_backed_up: bool,
    // One-shot tampering, consumed by the next ceremony.
    next_origin: Option<String>,
    next_rp_id: Option<String>,
    next_uv: bool,
}

/// One stored credential (P-256 key kept as PKCS#8 so the key can be cloned).
#[derive(Clone, Debug)]
pub struct Cred {
    pub id: Vec<u8>,
    pkcs8: Vec<u8>,
    pub user_handle: Vec<u8>,
    pub rp_id: String,
    /// Last signCount sent; the next assertion sends `counter + 1`.
    pub counter: u32,
    pub backup_eligible: bool,
    pub backed_up: bool,
}

impl Cred {
    fn key_pair(&self) -> EcdsaKeyPair {
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &self.pkcs8,
            &SystemRandom::new(),
        )
        .expect("stored pkcs8")
    }
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url, with or without padding.
pub fn unb64(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .expect("base64url")
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// Accepts `{"publicKey": {...}}` or the inner object.
fn inner(options: &Value) -> &Value {
    options.get("publicKey").unwrap_or(options)
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Credential ids listed in `excludeCredentials` / `allowCredentials`.
fn id_list(v: &Value, key: &str) -> Vec<Vec<u8>> {
    let list = v.get(key).and_then(Value::as_array);
    list.into_iter()
        .flatten()
        .filter_map(|d| str_field(d, "id"))
        .map(unb64)
        .collect()
}

// --- minimal CBOR writer (definite lengths only) ---
fn cbor_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    let be = n.to_be_bytes();
    match n {
        0..=23 => out.push(m | be[7]),
        24..=0xff => out.extend([m | 24, be[7]]),
        0x100..=0xffff => out.extend([&[m | 25], &be[6..]].concat()),
        0x1_0000..=0xffff_ffff => out.extend([&[m | 26], &be[4..]].concat()),
        _ => out.extend([&[m | 27], &be[..]].concat()),
    }
}
fn cbor_int(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        cbor_head(out, 0, v as u64);
    } else {
        cbor_head(out, 1, (-1 - v) as u64);
    }
}
fn cbor_bytes(out: &mut Vec<u8>, b: &[u8]) {
    cbor_head(out, 2, b.len() as u64);
    out.extend_from_slice(b);
}
fn cbor_text(out: &mut Vec<u8>, s: &str) {
    cbor_head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// COSE_Key for an uncompressed P-256 point (0x04 | x | y).
fn cose_es256(public: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    cbor_head(&mut out, 5, 5);
    for (k, v) in [(1, 2), (3, -7), (-1, 1)] {
        cbor_int(&mut out, k); // kty EC2, alg ES256, crv P-256
        cbor_int(&mut out, v);
    }
    cbor_int(&mut out, -2);
    cbor_bytes(&mut out, &public[1..33]);
    cbor_int(&mut out, -3);
    cbor_bytes(&mut out, &public[33..65]);
    out
}

impl SoftKey {
    pub fn new(origin: &str) -> Self {
        let url = url::Url::parse(origin).expect("origin URL");
        SoftKey {
            origin: origin.trim_end_matches('/').to_owned(),
            rp_id: url.host_str().expect("origin host").to_owned(),
            credentials: Vec::new(),
            new_backup_eligible: false,
            new_backed_up: false,
            next_origin: None,
            next_rp_id: None,
            next_uv: true,
        }
    }

    /// Next ceremony claims this origin in clientDataJSON.
    pub fn wrong_origin(&mut self, origin: &str) -> &mut Self {
        self.next_origin = Some(origin.to_owned());
        self
    }
    /// Next ceremony hashes this rp id into authenticatorData.
    pub fn wrong_rp_id(&mut self, rp_id: &str) -> &mut Self {
        self.next_rp_id = Some(rp_id.to_owned());
        self
    }
    /// Next ceremony leaves the UV flag off.
    pub fn without_uv(&mut self) -> &mut Self {
        self.next_uv = false;
        self
    }
    /// The credential with this id (panics when unknown).
    pub fn cred_mut(&mut self, id: &[u8]) -> &mut Cred {
        self.credentials
            .iter_mut()
            .find(|c| c.id == id)
            .expect("known credential")
    }

    /// authData prefix + clientDataJSON, consuming the one-shot knobs.
    fn ceremony(&mut self, kind: &str, o: &Value, rp_id: &str, c: &Cred) -> (Vec<u8>, Vec<u8>) {
        let origin = self
            .next_origin
            .take()
            .unwrap_or_else(|| self.origin.clone());
        let hashed_rp = self.next_rp_id.take().unwrap_or_else(|| rp_id.to_owned());
        let uv = std::mem::replace(&mut self.next_uv, true);
        let challenge = str_field(o, "challenge").expect("options.challenge");
        let client_data =
            json!({"type": kind, "challenge": challenge, "origin": origin, "crossOrigin": false});
        let mut flags = 0x01; // UP
        flags |= if uv { 0x04 } else { 0 };
        flags |= if c.backup_eligible { 0x08 } else { 0 };
        flags |= if c.backed_up { 0x10 } else { 0 };
        flags |= if kind == "webauthn.create" { 0x40 } else { 0 }; // AT
        let mut auth_data = sha256(hashed_rp.as_bytes());
        auth_data.push(flags);
        auth_data.extend(c.counter.to_be_bytes());
        (auth_data, serde_json::to_vec(&client_data).expect("json"))
    }

    fn rp_id_of(&self, o: &Value, key: &str) -> String {
        str_field(o, key).map_or_else(|| self.rp_id.clone(), str::to_owned)
    }

    /// Answers creation options with a new ES256 credential (stored, counter 1), or Err when one
    /// of our credentials is in `excludeCredentials`.
    pub fn try_register(&mut self, options: &Value) -> Result<Value, String> {
        let o = inner(options);
        let rp_id = self.rp_id_of(o.get("rp").unwrap_or(&Value::Null), "id");
        let excluded = id_list(o, "excludeCredentials");
        if self.credentials.iter().any(|c| excluded.contains(&c.id)) {
            return Err("credential excluded".to_owned());
        }
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("keygen");
        let mut id = vec![0; 16];
        rng.fill(&mut id).expect("random");
        let user = o
            .get("user")
            .and_then(|u| str_field(u, "id"))
            .expect("options.user.id");
        let cred = Cred {
            id: id.clone(),
            pkcs8: pkcs8.as_ref().to_vec(),
            user_handle: unb64(user),
            rp_id: rp_id.clone(),
            counter: 1,
            backup_eligible: self.new_backup_eligible,
            backed_up: self.new_backed_up,
        };
        let (mut auth_data, client_data) = self.ceremony("webauthn.create", o, &rp_id, &cred);
        auth_data.extend([0; 16]); // aaguid
        auth_data.extend((id.len() as u16).to_be_bytes());
        auth_data.extend(&id);
        auth_data.extend(cose_es256(cred.key_pair().public_key().as_ref()));
        let mut att = Vec::new();
        cbor_head(&mut att, 5, 3);
        cbor_text(&mut att, "fmt");
        cbor_text(&mut att, "none");
        cbor_text(&mut att, "attStmt");
        cbor_head(&mut att, 5, 0);
        cbor_text(&mut att, "authData");
        cbor_bytes(&mut att, &auth_data);
        self.credentials.push(cred);
        Ok(json!({
            "id": b64(&id), "rawId": b64(&id), "type": "public-key",
            "response": {
                "attestationObject": b64(&att), "clientDataJSON": b64(&client_data),
                "transports": ["internal"]
            },
            "extensions": {}
        }))
    }

    /// [`Self::try_register`], panicking when excluded.
    pub fn register(&mut self, options: &Value) -> Value {
        self.try_register(options).expect("register")
    }

    /// Answers request options with the first credential for `rpId` that is in
    /// `allowCredentials` (any, when the list is empty: discoverable), incrementing its counter.
    pub fn try_sign(&mut self, options: &Value) -> Result<Value, String> {
        let o = inner(options);
        let rp_id = self.rp_id_of(o, "rpId");
        let allowed = id_list(o, "allowCredentials");
        let idx = self
            .credentials
            .iter()
            .position(|c| c.rp_id == rp_id && (allowed.is_empty() || allowed.contains(&c.id)))
            .ok_or_else(|| format!("no credential for {rp_id}"))?;
        self.credentials[idx].counter = self.credentials[idx].counter.wrapping_add(1);
        let cred = self.credentials[idx].clone();
        let (auth_data, client_data) = self.ceremony("webauthn.get", o, &rp_id, &cred);
        let mut signed = auth_data.clone();
        signed.extend(sha256(&client_data));
        let sig = cred
            .key_pair()
            .sign(&SystemRandom::new(), &signed)
            .expect("sign");
        Ok(json!({
            "id": b64(&cred.id), "rawId": b64(&cred.id), "type": "public-key",
            "response": {
                "authenticatorData": b64(&auth_data), "clientDataJSON": b64(&client_data),
                "signature": b64(sig.as_ref()), "userHandle": b64(&cred.user_handle)
            },
            "extensions": {}
        }))
    }

    /// [`Self::try_sign`], panicking when no credential matches.
    pub fn sign(&mut self, options: &Value) -> Value {
        self.try_sign(options).expect("sign")
    }
}

/// Self-test against webauthn-rs itself (no server).
mod self_test {
    use super::SoftKey;
    use serde_json::{Value, json};
    use webauthn_rs::prelude::WebauthnError as E;
    use webauthn_rs::prelude::*;

    /// One passkey authentication (result and the key's response); `prep` tampers with the
    /// key and the options first.
    fn auth(
        w: &Webauthn,
        key: &mut SoftKey,
        pk: &Passkey,
        prep: impl FnOnce(&mut SoftKey, &mut Value),
    ) -> (WebauthnResult<AuthenticationResult>, PublicKeyCredential) {
        let (rcr, state) = w
            .start_passkey_authentication(std::slice::from_ref(pk))
            .unwrap();
        let mut opts = serde_json::to_value(&rcr).unwrap();
        prep(key, &mut opts);
        let resp = serde_json::from_value(key.sign(&opts)).unwrap();
        (w.finish_passkey_authentication(&resp, &state), resp)
    }

    /// One passkey registration.
    fn enrol(w: &Webauthn, key: &mut SoftKey, user: Uuid) -> Passkey {
        let (ccr, reg) = w.start_passkey_registration(user, "a", "A", None).unwrap();
        let resp = key.register(&serde_json::to_value(&ccr).unwrap());
        w.finish_passkey_registration(&serde_json::from_value(resp).unwrap(), &reg)
            .unwrap()
    }

    #[test]
    fn soft_key_passes_webauthn_rs() {
        let origin = "http://localhost:8080";
        let w = WebauthnBuilder::new("localhost", &Url::parse(origin).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let mut key = SoftKey::new(origin);
        let user = Uuid::new_v4();
        let mut passkey = enrol(&w, &mut key, user);
        assert_eq!(
            passkey.cred_id().as_slice(),
            key.credentials[0].id.as_slice()
        );

        let res = auth(&w, &mut key, &passkey, |_, _| {}).0.unwrap();
        assert!(res.user_verified() && !res.backup_eligible());
        assert_eq!(res.counter(), 2); // registration sent 1
        passkey.update_credential(&res);

        // Each attack on a copy of the key, against the stored passkey (counter 2).
        type Tamper = fn(&mut SoftKey);
        let attacks: [(&str, Tamper); 5] = [
            ("InvalidRPOrigin", |k| {
                _ = k.wrong_origin("http://evil.example:8080")
            }),
            ("InvalidRPIDHash", |k| _ = k.wrong_rp_id("evil.example")),
            ("UserNotVerified", |k| _ = k.without_uv()),
            // BS without BE (BE false -> true alone is an accepted passkey upgrade).
            ("CredentialMayNotBeHardwareBound", |k| {
                k.credentials[0].backed_up = true
            }),
            ("CredentialPossibleCompromise", |k| {
                k.credentials[0].counter = 0
            }),
        ];
        for (want, tamper) in attacks {
            let e = auth(&w, &mut key.clone(), &passkey, |k, _| tamper(k)).0;
            assert_eq!(format!("{:?}", e.unwrap_err()), want);
        }

        // A cloned authenticator left behind: once the original advances (and the server
        // stores the new counter), the stale copy's counter is not greater than the stored one.
        let mut stale = key.clone();
        let res = auth(&w, &mut key, &passkey, |_, _| {}).0.unwrap();
        passkey.update_credential(&res);
        let e = auth(&w, &mut stale, &passkey, |_, _| {}).0;
        assert!(matches!(e, Err(E::CredentialPossibleCompromise)), "{e:?}");

        // Discoverable shape (webauthn-rs's discoverable API needs its "conditional-ui" feature):
        // with an empty allowCredentials the key picks by rp id and returns the user handle.
        let (res, resp) = auth(&w, &mut key, &passkey, |_, o| {
            o["publicKey"]["allowCredentials"] = json!([])
        });
        assert!(res.unwrap().user_verified());
        assert_eq!(resp.get_user_unique_id(), Some(user.as_bytes().as_slice()));
        assert_eq!(resp.get_credential_id(), passkey.cred_id().as_slice());

        // Excluded credential: the key refuses to register again (inner options object accepted).
        let excl = Some(vec![passkey.cred_id().clone()]);
        let (ccr, _) = w.start_passkey_registration(user, "a", "A", excl).unwrap();
        assert!(
            key.try_register(&serde_json::to_value(&ccr).unwrap()["publicKey"])
                .is_err()
        );

        // A synced (BE+BS) passkey registers and signs; dropping BE afterwards is refused.
        (key.new_backup_eligible, key.new_backed_up) = (true, true);
        let synced = enrol(&w, &mut key, user);
        let res = auth(&w, &mut key, &synced, |_, _| {}).0.unwrap();
        assert!(res.backup_eligible() && res.backup_state());
        let id = synced.cred_id().to_vec();
        let e = auth(&w, &mut key, &synced, |k, _| {
            k.cred_mut(&id).backup_eligible = false
        })
        .0;
        assert!(
            matches!(e, Err(E::CredentialBackupEligibilityInconsistent)),
            "{e:?}"
        );
    }
}
