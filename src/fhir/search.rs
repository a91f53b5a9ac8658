//! Search parameters: parsed against the table of what each type supports
//! (`resources::params_of`, which the CapabilityStatement lists too), so that a
//! parameter Custodian does not implement is refused, never ignored: ignoring one would
//! answer with more PHI than was asked for.

use super::dates::{DateRange, Prefix};
use super::resources::{ParamKind, ResourceType, Token, params_of};
use crate::records::service::Probe;

/// Most resources in one page (`_count`).
pub const MAX_COUNT: usize = 100;
pub const DEFAULT_COUNT: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    /// Most recent clinical time first, then id.
    Recent,
    /// By id.
    Id,
}

/// A parsed search.
#[derive(Debug)]
pub struct Query {
    /// The compartment (required for every type but Patient).
    pub patient: Option<String>,
    /// Token parameters: each is AND'ed, its comma-separated values OR'ed.
    pub tokens: Vec<(&'static str, Vec<Token>)>,
    pub dates: Vec<(&'static str, Prefix, DateRange)>,
    pub strings: Vec<(&'static str, String)>,
    /// Patient `_id`.
    pub ids: Option<Vec<String>>,
    /// A Patient `birthdate` given as a day without prefix (for its blind index).
    pub raw_birthdate: Option<String>,
    pub count: usize,
    pub cursor: Option<String>,
    pub anonymize: bool,
    pub sort: Sort,
    /// The criteria, sorted and encoded, without the cursor and `_format`: what a cursor
    /// is bound to, and the `self` link's query.
    pub canonical: String,
}

impl Query {
    /// The one blind index a Patient search reads first (`None`: all patients).
    pub fn probe(&self) -> Option<(Probe, String)> {
        for (name, probe) in [
            ("identifier", Probe::Identifier),
            ("name", Probe::Name),
            ("family", Probe::Family),
            ("given", Probe::Given),
        ] {
            if let Some((_, v)) = self.strings.iter().find(|(n, _)| *n == name) {
                return Some((probe, v.clone()));
            }
            if let Some((_, values)) = self.tokens.iter().find(|(n, _)| *n == name)
                && let [t] = values.as_slice()
                && let Some(code) = &t.code
            {
                return Some((probe, code.clone()));
            }
        }
        match self.dates.as_slice() {
            [(_, Prefix::Eq, _)] => self.raw_birthdate.clone().map(|d| (Probe::BirthDate, d)),
            _ => None,
        }
    }

    /// The one name criterion of a search that has nothing else (`name=smith`): its
    /// blind index answers it exactly, a page at a time.
    pub fn name_only(&self) -> Option<(Probe, &str)> {
        if self.ids.is_some() || !self.tokens.is_empty() || !self.dates.is_empty() {
            return None;
        }
        match self.strings.as_slice() {
            [(name, v)] => {
                let probe = match *name {
                    "name" => Probe::Name,
                    "family" => Probe::Family,
                    "given" => Probe::Given,
                    _ => return None,
                };
                Some((probe, v.as_str()))
            }
            _ => None,
        }
    }

    /// Whether the search has no criterion at all (a list of every patient).
    pub fn unfiltered(&self) -> bool {
        self.ids.is_none()
            && self.tokens.is_empty()
            && self.dates.is_empty()
            && self.strings.is_empty()
    }
}

/// What went wrong with a search: always a 400.
pub type Bad = String;

fn supported(t: ResourceType) -> String {
    let mut names: Vec<&str> = params_of(t).iter().map(|p| p.name).collect();
    names.extend(["_count", "_format", "_anonymize"]);
    names.join(", ")
}

/// The id in `ID`, `Patient/ID` or `<base>/Patient/ID`.
pub fn patient_reference(v: &str) -> Option<&str> {
    let id = match v.rfind("Patient/") {
        Some(i) => &v[i + "Patient/".len()..],
        None if !v.contains('/') => v,
        None => return None,
    };
    super::service::valid_id(id).then_some(id)
}

/// Parses the search of `t` from its query pairs (a GET's query or a POST's form).
pub fn parse(t: ResourceType, pairs: &[(String, String)]) -> Result<Query, Bad> {
    let mut q = Query {
        patient: None,
        tokens: Vec::new(),
        dates: Vec::new(),
        strings: Vec::new(),
        ids: None,
        raw_birthdate: None,
        count: DEFAULT_COUNT,
        cursor: None,
        anonymize: false,
        sort: if t == ResourceType::Patient {
            Sort::Id
        } else {
            Sort::Recent
        },
        canonical: String::new(),
    };
    let mut canonical: Vec<(String, String)> = Vec::new();
    for (k, v) in pairs {
        let (name, modifier) = match k.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (k.as_str(), None),
        };
        if let Some(m) = modifier {
            return Err(format!(
                "the modifier :{m} (in {k}) is not supported; Custodian supports no search modifiers"
            ));
        }
        if v.is_empty() {
            return Err(format!("the parameter {name} has no value"));
        }
        if !matches!(name, "_cursor" | "_format") {
            canonical.push((k.clone(), v.clone()));
        }
        match name {
            "_count" => {
                q.count = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n <= MAX_COUNT)
                    .ok_or_else(|| {
                        format!("_count must be a whole number from 0 to {MAX_COUNT}")
                    })?;
                continue;
            }
            "_format" => {
                if !super::routes::json_format(v) {
                    return Err(format!(
                        "_format {v} is not supported: this server answers in JSON"
                    ));
                }
                continue;
            }
            "_anonymize" => {
                q.anonymize = match v.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err("_anonymize must be true or false".into()),
                };
                continue;
            }
            "_cursor" => {
                q.cursor = Some(v.clone());
                continue;
            }
            // Most recent first is the order of every clinical search already; that
            // order may be asked for by name (SMART apps do), no other.
            "_sort" => {
                let recent = t != ResourceType::Patient
                    && v.strip_prefix('-').is_some_and(|d| {
                        params_of(t)
                            .iter()
                            .any(|p| p.name == d && p.kind == ParamKind::Date)
                    });
                if !recent {
                    return Err(
                        "_sort supports only -<date parameter> (most recent first, the default order of clinical searches)".into(),
                    );
                }
                continue;
            }
            _ => {}
        }
        let Some(spec) = params_of(t).iter().find(|p| p.name == name) else {
            return Err(format!(
                "the search parameter {name} is unknown or not supported for {}; supported: {}",
                t.as_str(),
                supported(t)
            ));
        };
        match spec.kind {
            ParamKind::Reference => {
                if q.patient.is_some() {
                    return Err(
                        "give patient once: a search reads one patient's compartment".into(),
                    );
                }
                if v.contains(',') {
                    return Err(
                        "patient takes one patient: a search reads one patient's compartment"
                            .into(),
                    );
                }
                let id = patient_reference(v).ok_or_else(|| {
                    "patient must be an id, Patient/<id> or a Patient URL".to_owned()
                })?;
                q.patient = Some(id.to_owned());
            }
            ParamKind::Token if name == "_id" => {
                let ids: Vec<String> = v.split(',').map(str::to_owned).collect();
                if ids.iter().any(|i| !super::service::valid_id(i)) {
                    return Err("_id must be ids (A-Z a-z 0-9 - .), separated by commas".into());
                }
                q.ids = Some(match q.ids.take() {
                    None => ids,
                    Some(prev) => prev.into_iter().filter(|i| ids.contains(i)).collect(),
                });
            }
            ParamKind::Token => {
                let values: Vec<Token> = v.split(',').map(Token::parse).collect();
                if values
                    .iter()
                    .any(|t| t.code.is_none() && t.system.as_deref().is_none_or(str::is_empty))
                {
                    return Err(format!("{name} needs a code (system|code or code)"));
                }
                q.tokens.push((spec.name, values));
            }
            ParamKind::Date => {
                if v.contains(',') {
                    return Err(format!(
                        "{name} takes one date per parameter (repeat it for a range)"
                    ));
                }
                let (prefix, date) = Prefix::split(v).ok_or_else(|| {
                    format!(
                        "{name}: the prefix is not supported; supported: {}",
                        Prefix::NAMES
                    )
                })?;
                let range = DateRange::parse_datetime(date).ok_or_else(|| {
                    format!(
                        "{name} must be a FHIR date or dateTime, optionally after a prefix ({})",
                        Prefix::NAMES
                    )
                })?;
                if t == ResourceType::Patient && prefix == Prefix::Eq && date.len() == 10 {
                    q.raw_birthdate = Some(date.to_owned());
                }
                q.dates.push((spec.name, prefix, range));
            }
            ParamKind::String => {
                if v.contains(',') {
                    return Err(format!("{name} takes one name"));
                }
                if v.chars().count() > 100 {
                    return Err(format!("{name} is too long"));
                }
                q.strings.push((spec.name, v.clone()));
            }
        }
    }
    if t == ResourceType::Patient {
        let indexed = q.ids.is_some()
            || !q.strings.is_empty()
            || q.tokens.iter().any(|(n, _)| *n == "identifier");
        if q.tokens.iter().any(|(n, _)| *n == "gender") && !indexed {
            return Err(
                "gender must be combined with name, family, given, identifier or _id".into(),
            );
        }
        if !indexed && q.dates.iter().any(|(_, p, _)| *p != Prefix::Eq) {
            return Err("birthdate with a prefix must be combined with name, family, given, identifier or _id".into());
        }
        if !indexed && q.dates.len() > 1 {
            return Err("give birthdate once, or combine it with name, identifier or _id".into());
        }
    } else if q.patient.is_none() {
        return Err(format!(
            "a search of {} needs patient=<id>: searches read one patient's compartment",
            t.as_str()
        ));
    }
    canonical.sort();
    q.canonical = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(canonical.iter())
        .finish();
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(s: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(s.as_bytes()).into_owned().collect()
    }

    #[test]
    fn parameters_are_checked_against_the_table() {
        let q = parse(
            ResourceType::Observation,
            &pairs(
                "patient=Patient/p1&category=laboratory,vital-signs&date=ge2024-01-01&date=lt2025",
            ),
        )
        .unwrap();
        assert_eq!(q.patient.as_deref(), Some("p1"));
        assert_eq!(q.tokens[0].1.len(), 2);
        assert_eq!(q.dates.len(), 2);
        let same = parse(ResourceType::Observation, &pairs("date=lt2025&category=laboratory,vital-signs&patient=Patient/p1&date=ge2024-01-01&_cursor=x")).unwrap();
        assert_eq!(
            q.canonical, same.canonical,
            "order and the cursor do not change the search"
        );
        for bad in [
            "patient=p1&foo=1",
            "patient=p1&code:text=x",
            "category=laboratory",
            "patient=p1,p2",
            "patient=p1&date=ap2024",
            "patient=p1&date=2024-13",
            "patient=p1&_count=1000",
            "patient=p1&_sort=date",
            "patient=p1&_sort=-code",
            "patient=p1&category=",
        ] {
            assert!(
                parse(ResourceType::Observation, &pairs(bad)).is_err(),
                "{bad}"
            );
        }
        assert!(parse(ResourceType::Patient, &pairs("gender=female")).is_err());
        assert!(parse(ResourceType::Patient, &pairs("gender=female&name=smith")).is_ok());
        assert!(parse(ResourceType::Patient, &pairs("birthdate=1960-01-01")).is_ok());
        assert!(parse(ResourceType::Patient, &pairs("birthdate=ge1960")).is_err());
        assert_eq!(
            patient_reference("https://x.example/fhir/Patient/abc"),
            Some("abc")
        );
        assert_eq!(patient_reference("Group/abc"), None);
    }
}
