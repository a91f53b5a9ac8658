//! Synthetic patients for demos and benchmarks: names from short lists of common first
//! and last names, dates, numbers and diagnoses picked at random. Never real data.

use super::model::{NewPatient, NewRecord};
use super::service::{Patients, PhiError};

const GIVEN: [&str; 24] = [
    "Ada", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira",
    "Luis", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor",
    "Wen", "Yusuf",
];
const FAMILY: [&str; 24] = [
    "Abbott", "Baker", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ito",
    "Jensen", "Kowalski", "Lopez", "Moreau", "Nakamura", "Okafor", "Petrov", "Quispe", "Rossi",
    "Silva", "Tanaka", "Umar", "Varga", "Weber", "Zhang",
];
const DIAGNOSES: [&str; 8] = [
    "Essential hypertension",
    "Type 2 diabetes mellitus",
    "Atrial fibrillation",
    "Asthma",
    "Chronic kidney disease, stage 3",
    "Iron deficiency anaemia",
    "Osteoarthritis of knee",
    "Migraine",
];

/// A small non-cryptographic generator (xorshift) seeded from the OS: good enough to
/// scatter fake data, never used for secrets.
pub struct Rng(u64);

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    pub fn new() -> Self {
        let seed = crate::crypto::random_bytes::<8>()
            .map(u64::from_le_bytes)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Self(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs.get(self.below(xs.len() as u64) as usize)
            .copied()
            .unwrap_or("")
    }
}

/// Creates `count` patients with one or two records each. Returns the new patients'
/// ids and how many records were made.
pub async fn seed(patients: &Patients, count: u32) -> Result<(Vec<String>, u32), PhiError> {
    let mut rng = Rng::new();
    let mut records = 0;
    let mut ids = Vec::new();
    for _ in 0..count {
        let given = rng.pick(&GIVEN);
        let family = rng.pick(&FAMILY);
        let input = NewPatient {
            given_name: given.to_owned(),
            family_name: family.to_owned(),
            birth_date: format!(
                "{}-{:02}-{:02}",
                1930 + rng.below(90),
                1 + rng.below(12),
                1 + rng.below(28)
            ),
            sex: Some(["female", "male", "other", "unknown"][rng.below(4) as usize % 4].to_owned()),
            ssn: Some(format!(
                "{:03}-{:02}-{:04}",
                100 + rng.below(565),
                1 + rng.below(98),
                1 + rng.below(9998)
            )),
            email: Some(format!(
                "{}.{}{}@example.org",
                given.to_lowercase(),
                family.to_lowercase(),
                rng.below(1000)
            )),
            phone: Some(format!(
                "+1 555 01{:02} {:04}",
                rng.below(100),
                rng.below(10_000)
            )),
            address: Some(format!(
                "{} Example Street, Springfield",
                1 + rng.below(999)
            )),
            mrn: None,
        };
        let p = patients.create(input).await?;
        ids.push(p.id.clone());
        for _ in 0..(1 + rng.below(2)) {
            patients
                .add_record(
                    &p.id,
                    NewRecord {
                        diagnosis: rng.pick(&DIAGNOSES).to_owned(),
                        treatment: Some("Follow-up in three months".into()),
                        notes: None,
                        recorded_at: None,
                        labels: None,
                    },
                )
                .await?;
            records += 1;
        }
    }
    Ok((ids, records))
}
