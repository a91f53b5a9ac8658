//! Patient: the patients table as a FHIR (US Core) Patient, and back. Custodian keeps
//! one name, an MRN, an SSN, one phone, one email and one address as text; a Patient
//! with more than that is refused (422), never stored in part.

use serde::Deserialize;
use serde_json::{Value, json};

use super::types::{Findings, Meta};
use crate::records::model::NewPatient;
use crate::records::service::Patient;

pub const SSN_SYSTEM: &str = "http://hl7.org/fhir/sid/us-ssn";
const MR_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";

// Some elements are accepted (a client may send them) but not kept: `use`, `type`,
// `text`, `meta`.
#[allow(dead_code)]
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Identifier {
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    r#type: Option<super::types::CodeableConcept>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

// Some elements are accepted (a client may send them) but not kept: `use`, `type`,
// `text`, `meta`.
#[allow(dead_code)]
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HumanName {
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    family: Option<String>,
    #[serde(default)]
    given: Vec<String>,
}

// Some elements are accepted (a client may send them) but not kept: `use`, `type`,
// `text`, `meta`.
#[allow(dead_code)]
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ContactPoint {
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
}

// Some elements are accepted (a client may send them) but not kept: `use`, `type`,
// `text`, `meta`.
#[allow(dead_code)]
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Address {
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    line: Vec<String>,
    #[serde(default)]
    city: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    postal_code: Option<String>,
    #[serde(default)]
    country: Option<String>,
}

// Some elements are accepted (a client may send them) but not kept: `use`, `type`,
// `text`, `meta`.
#[allow(dead_code)]
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PatientIn {
    #[serde(default)]
    meta: Option<Meta>,
    #[serde(default)]
    identifier: Vec<Identifier>,
    #[serde(default)]
    active: Option<bool>,
    #[serde(default)]
    name: Vec<HumanName>,
    #[serde(default)]
    telecom: Vec<ContactPoint>,
    #[serde(default)]
    gender: Option<String>,
    #[serde(default)]
    birth_date: Option<String>,
    #[serde(default)]
    address: Vec<Address>,
}

/// A FHIR Patient (without `resourceType` and `id`) as Custodian's patient fields.
/// Field errors name FHIR elements; the values are checked again by the patients
/// service (the same rules as `/api/v1`).
pub fn from_fhir(v: Value, mrn_system: &str) -> Result<NewPatient, Findings> {
    let mut f = Findings::default();
    let p: PatientIn = match serde_path_to_error::deserialize(v) {
        Ok(p) => p,
        Err(e) => {
            f.add(
                super::service::expression("Patient", &e),
                super::service::serde_message(&e),
            );
            return Err(f);
        }
    };
    if p.active == Some(false) {
        f.add(
            "Patient.active",
            "an inactive patient is deleted instead (DELETE)",
        );
    }
    let mut mrn = None;
    let mut ssn = None;
    for (i, id) in p.identifier.iter().enumerate() {
        let at = format!("Patient.identifier[{i}]");
        match (id.system.as_deref(), id.value.as_deref()) {
            (Some(s), Some(v)) if s == mrn_system && mrn.is_none() => mrn = Some(v.to_owned()),
            (Some(SSN_SYSTEM), Some(v)) if ssn.is_none() => ssn = Some(v.to_owned()),
            (None, _) => f.add(format!("{at}.system"), "is required"),
            (_, None) => f.add(format!("{at}.value"), "is required"),
            _ => f.add(
                &at,
                format!("Custodian keeps one MRN ({mrn_system}) and one SSN ({SSN_SYSTEM}) only"),
            ),
        }
    }
    let (mut given, mut family) = (String::new(), String::new());
    match p.name.as_slice() {
        [] => f.add(
            "Patient.name",
            "is required (one name with family and given)",
        ),
        [n] => {
            match &n.family {
                Some(x) => family.clone_from(x),
                None => f.add("Patient.name[0].family", "is required"),
            }
            if n.given.is_empty() {
                f.add("Patient.name[0].given", "is required");
            }
            given = n.given.join(" ");
        }
        _ => f.add("Patient.name", "Custodian keeps one name"),
    }
    let (mut phone, mut email) = (None, None);
    for (i, t) in p.telecom.iter().enumerate() {
        let at = format!("Patient.telecom[{i}]");
        match (t.system.as_deref(), &t.value) {
            (Some("phone"), Some(v)) if phone.is_none() => phone = Some(v.clone()),
            (Some("email"), Some(v)) if email.is_none() => email = Some(v.clone()),
            (_, None) => f.add(format!("{at}.value"), "is required"),
            _ => f.add(at, "Custodian keeps one phone and one email"),
        }
    }
    let address = match p.address.as_slice() {
        [] => None,
        [a] => {
            let text = a.text.clone().unwrap_or_else(|| {
                let mut parts: Vec<String> = a.line.clone();
                let tail: Vec<&str> = [&a.city, &a.state, &a.postal_code, &a.country]
                    .into_iter()
                    .filter_map(|x| x.as_deref())
                    .collect();
                if !tail.is_empty() {
                    parts.push(tail.join(" "));
                }
                parts.join(", ")
            });
            Some(text)
        }
        _ => {
            f.add("Patient.address", "Custodian keeps one address");
            None
        }
    };
    let birth_date = match p.birth_date {
        Some(b) if b.len() == 10 => b,
        Some(_) => {
            f.add("Patient.birthDate", "must be a full date YYYY-MM-DD");
            String::new()
        }
        None => {
            f.add("Patient.birthDate", "is required");
            String::new()
        }
    };
    if !f.is_empty() {
        return Err(f);
    }
    Ok(NewPatient {
        given_name: given,
        family_name: family,
        birth_date,
        sex: p.gender,
        ssn,
        email,
        phone,
        address,
        mrn,
    })
}

/// Where the patients service's field names point in a FHIR Patient.
pub fn element_of(field: &str) -> &'static str {
    match field {
        "given_name" => "Patient.name[0].given",
        "family_name" => "Patient.name[0].family",
        "birth_date" => "Patient.birthDate",
        "sex" => "Patient.gender",
        "ssn" => "Patient.identifier",
        "mrn" => "Patient.identifier",
        "email" => "Patient.telecom",
        "phone" => "Patient.telecom",
        "address" => "Patient.address",
        _ => "Patient",
    }
}

#[derive(serde::Serialize)]
struct Code<'a> {
    system: &'a str,
    code: &'a str,
    display: &'a str,
}

#[derive(serde::Serialize)]
struct Concept<'a> {
    coding: [Code<'a>; 1],
}

#[derive(serde::Serialize)]
struct IdentifierOut<'a> {
    #[serde(rename = "use", skip_serializing_if = "Option::is_none")]
    use_: Option<&'a str>,
    #[serde(rename = "type")]
    type_: Concept<'a>,
    system: &'a str,
    value: &'a str,
}

#[derive(serde::Serialize)]
struct NameOut<'a> {
    #[serde(rename = "use")]
    use_: &'a str,
    family: &'a str,
    given: Vec<&'a str>,
}

#[derive(serde::Serialize)]
struct TelecomOut<'a> {
    system: &'a str,
    value: &'a str,
}

#[derive(serde::Serialize)]
struct AddressOut<'a> {
    text: &'a str,
}

#[derive(serde::Serialize)]
struct MetaOut<'a> {
    #[serde(rename = "versionId")]
    version_id: String,
    #[serde(rename = "lastUpdated")]
    last_updated: &'a str,
}

/// A Patient as answered (identified): serialised straight from the stored fields.
#[derive(serde::Serialize)]
pub struct PatientOut<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<MetaOut<'a>>,
    identifier: Vec<IdentifierOut<'a>>,
    name: [NameOut<'a>; 1],
    gender: &'a str,
    #[serde(rename = "birthDate")]
    birth_date: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    telecom: Vec<TelecomOut<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    address: Vec<AddressOut<'a>>,
}

/// A patient as a FHIR Patient: the SSN only for `sees_ssn` (never masked into an
/// identifier: without `phi:ssn` it is left out). `meta` is `(versionId, lastUpdated)`.
pub fn patient_out<'a>(
    p: &'a Patient,
    mrn_system: &'a str,
    sees_ssn: bool,
    meta: Option<(i64, &'a str)>,
) -> PatientOut<'a> {
    let f = &p.fields;
    let mut identifier = vec![IdentifierOut {
        use_: Some("usual"),
        type_: Concept {
            coding: [Code {
                system: MR_TYPE,
                code: "MR",
                display: "Medical record number",
            }],
        },
        system: mrn_system,
        value: &f.mrn,
    }];
    if let Some(ssn) = f.ssn.as_deref().filter(|_| sees_ssn) {
        identifier.push(IdentifierOut {
            use_: None,
            type_: Concept {
                coding: [Code {
                    system: MR_TYPE,
                    code: "SS",
                    display: "Social Security number",
                }],
            },
            system: SSN_SYSTEM,
            value: ssn,
        });
    }
    let mut telecom = Vec::new();
    if let Some(ph) = &f.phone {
        telecom.push(TelecomOut {
            system: "phone",
            value: ph,
        });
    }
    if let Some(e) = &f.email {
        telecom.push(TelecomOut {
            system: "email",
            value: e,
        });
    }
    PatientOut {
        resource_type: "Patient",
        id: &p.id,
        meta: meta.map(|(v, at)| MetaOut {
            version_id: v.to_string(),
            last_updated: at,
        }),
        identifier,
        name: [NameOut {
            use_: "official",
            family: &f.family_name,
            given: f.given_name.split_whitespace().collect(),
        }],
        gender: f.sex.as_deref().unwrap_or("unknown"),
        birth_date: &f.birth_date,
        telecom,
        address: f
            .address
            .as_deref()
            .map(|a| vec![AddressOut { text: a }])
            .unwrap_or_default(),
    }
}

/// [`patient_out`] as JSON, without `meta` (the caller adds it).
pub fn to_fhir(p: &Patient, mrn_system: &str, sees_ssn: bool) -> Value {
    serde_json::to_value(patient_out(p, mrn_system, sees_ssn, None)).unwrap_or(Value::Null)
}

/// The de-identified Patient (Safe Harbor): no identifier, name, telecom or address;
/// the birth date reduced to its year, or masked (with a data-absent reason) over 89;
/// the id replaced by `pseudonym`.
pub fn deidentified(p: &Patient, pseudonym: &str, today: time::Date) -> Value {
    let f = &p.fields;
    let birth = crate::records::model::parse_date(&f.birth_date);
    let age = birth.map(|b| crate::records::model::age_on(b, today));
    let mut out = json!({
        "resourceType": "Patient",
        "id": pseudonym,
        "gender": f.sex.as_deref().unwrap_or("unknown"),
    });
    match (age, birth) {
        (Some(a), _) if a > 89 => {
            out["_birthDate"] = json!({"extension": [{
                "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                "valueCode": "masked"
            }]});
        }
        (_, Some(b)) => out["birthDate"] = json!(format!("{:04}", b.year())),
        _ => {}
    }
    out
}
