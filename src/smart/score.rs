//! The PRECISE-HBR score: a pure function of its inputs, no I/O.
//!
//! Source: Gragnano F. et al., "PRECISE-HBR score to predict bleeding after PCI",
//! Circulation 2025;151:343–355, Table 2 and Methods; the eGFR weight (0.055) and the
//! WBC floor (3 × 10⁹/L) follow the published reference calculator, with which the score
//! spans the paper's 0–70 range. Rules as researched: `docs/smart.md` § The score.
//!
//! - Continuous inputs are truncated to their range first, then points are added to a
//!   base of 2, and the total is rounded **half up** to an integer (22.5 → 23).
//! - A missing required input is never scored as zero silently: the result is
//!   `complete: false`, lists what is `missing`, and the score from what is known is a
//!   lower bound (every continuous term is at least 0 at its best value), with no
//!   category and no estimated risk.
//! - An input outside its physical range (negative, Hb > 25 g/dL, WBC > 500, age > 120, …)
//!   is an error (the API answers 422), never a truncation.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One continuous term: `points = weight × distance`, where the distance is measured
/// from `zero_at` (in the direction that raises the risk) after truncation to
/// [`low`, `high`].
#[derive(Debug, Clone, Copy)]
pub struct Continuous {
    pub name: &'static str,
    pub unit: &'static str,
    pub low: f64,
    pub high: f64,
    pub weight: f64,
    /// True when a higher value adds points (age, WBC); false when a lower one does
    /// (hemoglobin, eGFR).
    pub rising: bool,
    /// Values outside this range are refused as impossible (not truncated).
    pub physical: (f64, f64),
}

impl Continuous {
    pub fn points(&self, value: f64) -> f64 {
        let v = value.clamp(self.low, self.high);
        if self.rising {
            self.weight * (v - self.low)
        } else {
            self.weight * (self.high - v)
        }
    }
}

/// The coefficient table, in one place so that it can be checked against its source.
/// Weights are 10 × ln(sHR) of Table 2 rounded: age 1.28 per 10 y, Hb 0.78 per g/dL,
/// eGFR 0.95 per 10 units (0.055 per unit in the reference calculator), WBC 1.08 per
/// 10³/µL, previous bleeding 1.96, oral anticoagulation 1.58, ARC-HBR 1.34.
pub const BASE: f64 = 2.0;
pub const AGE: Continuous = Continuous {
    name: "age",
    unit: "years",
    low: 30.0,
    high: 80.0,
    weight: 0.25,
    rising: true,
    physical: (0.0, 120.0),
};
pub const HEMOGLOBIN: Continuous = Continuous {
    name: "hemoglobin",
    unit: "g/dL",
    low: 5.0,
    high: 15.0,
    weight: 2.5,
    rising: false,
    physical: (0.0, 25.0),
};
pub const EGFR: Continuous = Continuous {
    name: "egfr",
    unit: "mL/min/1.73 m²",
    low: 0.0,
    high: 100.0,
    weight: 0.055,
    rising: false,
    physical: (0.0, 300.0),
};
pub const WBC: Continuous = Continuous {
    name: "wbc",
    unit: "10⁹/L",
    low: 3.0,
    high: 15.0,
    weight: 0.8,
    rising: true,
    physical: (0.0, 500.0),
};
pub const PRIOR_BLEEDING_POINTS: f64 = 7.0;
pub const ORAL_ANTICOAGULATION_POINTS: f64 = 5.0;
pub const ARC_HBR_POINTS: f64 = 3.0;
/// Platelets below this (10⁹/L) count as the thrombocytopenia ARC-HBR element.
pub const PLATELETS_THRESHOLD: f64 = 100.0;
pub const PLATELETS_PHYSICAL: (f64, f64) = (0.0, 5000.0);
/// Serum creatinine, mg/dL.
pub const CREATININE_PHYSICAL: (f64, f64) = (0.0, 40.0);

/// Categories (paper): ≤ 22 not high bleeding risk (< 4 % at 1 year); 23–26 high
/// (4 % to < 6 %); ≥ 27 very high (≥ 6 %).
pub const HBR_FROM: i64 = 23;
pub const VERY_HBR_FROM: i64 = 27;

/// The additional ARC-HBR elements (any one counts once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ArcHbr {
    Thrombocytopenia,
    BleedingDiathesis,
    CirrhosisPortalHypertension,
    ActiveCancer,
    RecentSurgeryTrauma,
    NsaidSteroid,
}

impl ArcHbr {
    pub const ALL: [ArcHbr; 6] = [
        ArcHbr::Thrombocytopenia,
        ArcHbr::BleedingDiathesis,
        ArcHbr::CirrhosisPortalHypertension,
        ArcHbr::ActiveCancer,
        ArcHbr::RecentSurgeryTrauma,
        ArcHbr::NsaidSteroid,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ArcHbr::Thrombocytopenia => "thrombocytopenia",
            ArcHbr::BleedingDiathesis => "bleeding_diathesis",
            ArcHbr::CirrhosisPortalHypertension => "cirrhosis_portal_hypertension",
            ArcHbr::ActiveCancer => "active_cancer",
            ArcHbr::RecentSurgeryTrauma => "recent_surgery_trauma",
            ArcHbr::NsaidSteroid => "nsaid_steroid",
        }
    }

    pub const fn label(self) -> &'static str {
        match self {
            ArcHbr::Thrombocytopenia => "Platelets < 100 × 10⁹/L",
            ArcHbr::BleedingDiathesis => "Chronic bleeding diathesis",
            ArcHbr::CirrhosisPortalHypertension => "Liver cirrhosis with portal hypertension",
            ArcHbr::ActiveCancer => "Active malignancy",
            ArcHbr::RecentSurgeryTrauma => "Major surgery or trauma within 30 days",
            ArcHbr::NsaidSteroid => "Chronic NSAID or corticosteroid use",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Sex {
    Male,
    Female,
}

/// What the score is computed from. `None` is unknown.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    pub age: Option<f64>,
    pub hemoglobin: Option<f64>,
    pub egfr: Option<f64>,
    pub wbc: Option<f64>,
    pub creatinine: Option<f64>,
    pub sex: Option<Sex>,
    pub platelets: Option<f64>,
    pub prior_bleeding: bool,
    pub oral_anticoagulation: bool,
    pub arc_hbr: BTreeSet<ArcHbr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    NotHbr,
    Hbr,
    VeryHbr,
}

impl Category {
    pub fn of(score: i64) -> Self {
        if score >= VERY_HBR_FROM {
            Category::VeryHbr
        } else if score >= HBR_FROM {
            Category::Hbr
        } else {
            Category::NotHbr
        }
    }

    pub const fn label(self) -> &'static str {
        match self {
            Category::NotHbr => "Not high bleeding risk",
            Category::Hbr => "High bleeding risk",
            Category::VeryHbr => "Very high bleeding risk",
        }
    }
}

/// The schema of [`Component::value`]: a number, a boolean or null.
fn number_boolean_or_null() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([
            Type::Number,
            Type::Boolean,
            Type::Null,
        ]))
        .build()
}

/// One line of the result.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Component {
    pub name: &'static str,
    /// The value used (before truncation), a number or a boolean; null when unknown.
    #[schema(schema_with = number_boolean_or_null)]
    pub value: serde_json::Value,
    /// Points it adds (rounded to 3 decimals for display; the total uses the exact sum).
    pub points: f64,
    /// How the value was obtained when not given directly (e.g. eGFR from creatinine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub derived: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ScoreResult {
    /// The rounded score; a lower bound when `complete` is false.
    pub score: i64,
    /// Null when not complete.
    pub category: Option<Category>,
    /// Estimated 1-year BARC 3 or 5 bleeding risk in percent (a fitted curve: an
    /// estimate); null when not complete.
    pub estimated_risk_pct: Option<f64>,
    pub risk_text: String,
    pub components: Vec<Component>,
    pub missing: Vec<&'static str>,
    pub complete: bool,
}

/// An input outside its physical range.
#[derive(Debug, Clone, PartialEq)]
pub struct OutOfRange {
    pub field: &'static str,
    pub message: String,
}

fn check(
    field: &'static str,
    v: Option<f64>,
    (lo, hi): (f64, f64),
    unit: &str,
    errors: &mut Vec<OutOfRange>,
) {
    if let Some(x) = v
        && (!x.is_finite() || x < lo || x > hi)
    {
        errors.push(OutOfRange {
            field,
            message: format!("must be between {lo} and {hi} {unit}"),
        });
    }
}

/// Validates the physical ranges.
pub fn validate(i: &Inputs) -> Result<(), Vec<OutOfRange>> {
    let mut e = Vec::new();
    check("age", i.age, AGE.physical, AGE.unit, &mut e);
    check(
        "hemoglobin",
        i.hemoglobin,
        HEMOGLOBIN.physical,
        HEMOGLOBIN.unit,
        &mut e,
    );
    check("egfr", i.egfr, EGFR.physical, EGFR.unit, &mut e);
    check("wbc", i.wbc, WBC.physical, WBC.unit, &mut e);
    check(
        "platelets",
        i.platelets,
        PLATELETS_PHYSICAL,
        "10⁹/L",
        &mut e,
    );
    check(
        "creatinine",
        i.creatinine,
        CREATININE_PHYSICAL,
        "mg/dL",
        &mut e,
    );
    if let Some(c) = i.creatinine
        && c <= 0.0
        && e.iter().all(|x| x.field != "creatinine")
    {
        e.push(OutOfRange {
            field: "creatinine",
            message: "must be above 0 mg/dL".into(),
        });
    }
    if e.is_empty() { Ok(()) } else { Err(e) }
}

/// CKD-EPI 2021 (race-free) eGFR in mL/min/1.73 m² from serum creatinine in mg/dL.
pub fn ckd_epi_2021(creatinine_mg_dl: f64, age: f64, sex: Sex) -> f64 {
    let (kappa, alpha, factor) = match sex {
        Sex::Female => (0.7, -0.241, 1.012),
        Sex::Male => (0.9, -0.302, 1.0),
    };
    let r = creatinine_mg_dl / kappa;
    142.0 * r.min(1.0).powf(alpha) * r.max(1.0).powf(-1.200) * 0.9938_f64.powf(age) * factor
}

/// `100 × (1 − exp(−exp(−5.3945 + 0.09725 × score)))`: a curve fitted to the reference
/// calculator (22 → 3.8 %, 27 → 6.1 %, 45 → 30.3 %).
pub fn estimated_risk_pct(score: i64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let s = score as f64;
    let p = 100.0 * (1.0 - (-(-5.3945 + 0.09725 * s).exp()).exp());
    (p * 100.0).round() / 100.0
}

/// Half-up rounding that is not fooled by binary fractions (22.499999… from a sum
/// that is 22.5 in decimal).
pub fn round_half_up(x: f64) -> i64 {
    let cleaned = (x * 1e6).round() / 1e6;
    #[allow(clippy::cast_possible_truncation)]
    let r = (cleaned + 0.5).floor() as i64;
    r
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn num(v: Option<f64>) -> serde_json::Value {
    v.and_then(serde_json::Number::from_f64)
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// Computes the score. Call [`validate`] first: out-of-range values are truncated here.
pub fn compute(i: &Inputs) -> ScoreResult {
    let mut components = Vec::new();
    let mut missing = Vec::new();
    let mut total = BASE;

    let mut continuous = |c: &Continuous, v: Option<f64>, derived: Option<&'static str>| {
        let points = v.map_or(0.0, |x| c.points(x));
        if v.is_none() {
            missing.push(c.name);
        }
        total += points;
        components.push(Component {
            name: c.name,
            value: num(v.map(r3)),
            points: r3(points),
            derived,
        });
    };
    continuous(&AGE, i.age, None);
    continuous(&HEMOGLOBIN, i.hemoglobin, None);
    let (egfr, derived) = match (i.egfr, i.creatinine, i.age, i.sex) {
        (Some(e), _, _, _) => (Some(e), None),
        (None, Some(c), Some(a), Some(s)) if c > 0.0 => (
            Some(ckd_epi_2021(c, a, s)),
            Some("CKD-EPI 2021 from creatinine, age and sex"),
        ),
        _ => (None, None),
    };
    continuous(&EGFR, egfr, derived);
    continuous(&WBC, i.wbc, None);

    let mut flag = |name: &'static str, on: bool, points: f64| {
        let p = if on { points } else { 0.0 };
        total += p;
        components.push(Component {
            name,
            value: serde_json::Value::Bool(on),
            points: p,
            derived: None,
        });
    };
    flag("prior_bleeding", i.prior_bleeding, PRIOR_BLEEDING_POINTS);
    flag(
        "oral_anticoagulation",
        i.oral_anticoagulation,
        ORAL_ANTICOAGULATION_POINTS,
    );
    let thrombocytopenia = i.platelets.is_some_and(|p| p < PLATELETS_THRESHOLD);
    let arc = thrombocytopenia || !i.arc_hbr.is_empty();
    flag("arc_hbr", arc, ARC_HBR_POINTS);

    let score = round_half_up(total);
    let complete = missing.is_empty();
    let (category, risk, risk_text) = if complete {
        let c = Category::of(score);
        let r = estimated_risk_pct(score);
        (
            Some(c),
            Some(r),
            format!(
                "{}: estimated 1-year risk of BARC 3 or 5 bleeding {r:.1} % (an estimate from a fitted curve).",
                c.label()
            ),
        )
    } else {
        (
            None,
            None,
            format!(
                "Incomplete: {} unknown. {score} is a lower bound; no category is given.",
                missing.join(", ")
            ),
        )
    };
    ScoreResult {
        score,
        category,
        estimated_risk_pct: risk,
        risk_text,
        components,
        missing,
        complete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Inputs {
        // Every continuous term at its zero: age 30, Hb 15, eGFR 100, WBC 3.
        Inputs {
            age: Some(30.0),
            hemoglobin: Some(15.0),
            egfr: Some(100.0),
            wbc: Some(3.0),
            ..Inputs::default()
        }
    }

    fn points(r: &ScoreResult, name: &str) -> f64 {
        r.components
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.points)
            .unwrap()
    }

    #[test]
    fn the_minimum_is_the_base() {
        let r = compute(&base());
        assert_eq!(r.score, 2);
        assert!(r.complete);
        assert_eq!(r.category, Some(Category::NotHbr));
    }

    #[test]
    fn a_hand_computed_patient() {
        // 75 y: 0.25×45 = 11.25; Hb 12: 2.5×3 = 7.5; eGFR 50: 0.055×50 = 2.75;
        // WBC 8: 0.8×5 = 4.0; 2 + 25.5 = 27.5 → 28, very high.
        let i = Inputs {
            age: Some(75.0),
            hemoglobin: Some(12.0),
            egfr: Some(50.0),
            wbc: Some(8.0),
            ..Inputs::default()
        };
        let r = compute(&i);
        assert_eq!(points(&r, "age"), 11.25);
        assert_eq!(points(&r, "hemoglobin"), 7.5);
        assert_eq!(points(&r, "egfr"), 2.75);
        assert_eq!(points(&r, "wbc"), 4.0);
        assert_eq!(r.score, 28);
        assert_eq!(r.category, Some(Category::VeryHbr));
        assert_eq!(r.estimated_risk_pct, Some(6.68));
    }

    #[test]
    fn every_truncation_bound() {
        type Case = (fn(&mut Inputs, f64), f64, &'static str, f64);
        let cases: [Case; 12] = [
            (|i, v| i.age = Some(v), 20.0, "age", 0.0),
            (|i, v| i.age = Some(v), 30.0, "age", 0.0),
            (|i, v| i.age = Some(v), 80.0, "age", 12.5),
            (|i, v| i.age = Some(v), 95.0, "age", 12.5),
            (|i, v| i.hemoglobin = Some(v), 3.0, "hemoglobin", 25.0),
            (|i, v| i.hemoglobin = Some(v), 5.0, "hemoglobin", 25.0),
            (|i, v| i.hemoglobin = Some(v), 16.5, "hemoglobin", 0.0),
            (|i, v| i.egfr = Some(v), 130.0, "egfr", 0.0),
            (|i, v| i.egfr = Some(v), 0.0, "egfr", 5.5),
            (|i, v| i.wbc = Some(v), 1.0, "wbc", 0.0),
            (|i, v| i.wbc = Some(v), 15.0, "wbc", 9.6),
            (|i, v| i.wbc = Some(v), 40.0, "wbc", 9.6),
        ];
        for (set, value, name, expected) in cases {
            let mut i = base();
            set(&mut i, value);
            let r = compute(&i);
            assert_eq!(points(&r, name), expected, "{name} = {value}");
        }
    }

    #[test]
    fn half_rounds_up_and_crosses_a_category() {
        // 52 y: 5.5; bleeding 7; OAC 5; ARC-HBR 3; 2 + 20.5 = 22.5 → 23 (high).
        let mut i = base();
        i.age = Some(52.0);
        i.prior_bleeding = true;
        i.oral_anticoagulation = true;
        i.arc_hbr.insert(ArcHbr::ActiveCancer);
        let r = compute(&i);
        assert_eq!(r.score, 23);
        assert_eq!(r.category, Some(Category::Hbr));
        // 32 y: 0.5 → 2.5 → 3.
        let mut i = base();
        i.age = Some(32.0);
        assert_eq!(compute(&i).score, 3);
        // 31 y: 0.25 → 2.25 → 2.
        i.age = Some(31.0);
        assert_eq!(compute(&i).score, 2);
        assert_eq!(round_half_up(22.499_999_999_9), 23);
        assert_eq!(round_half_up(22.49), 22);
    }

    #[test]
    fn category_bounds() {
        assert_eq!(Category::of(22), Category::NotHbr);
        assert_eq!(Category::of(23), Category::Hbr);
        assert_eq!(Category::of(26), Category::Hbr);
        assert_eq!(Category::of(27), Category::VeryHbr);
    }

    #[test]
    fn each_boolean_adds_its_points_once() {
        let mut i = base();
        i.prior_bleeding = true;
        assert_eq!(compute(&i).score, 9);
        let mut i = base();
        i.oral_anticoagulation = true;
        assert_eq!(compute(&i).score, 7);
        for a in ArcHbr::ALL {
            let mut i = base();
            i.arc_hbr.insert(a);
            assert_eq!(compute(&i).score, 5, "{a:?}");
        }
        // Several elements still count once.
        let mut i = base();
        i.arc_hbr.extend(ArcHbr::ALL);
        i.platelets = Some(50.0);
        assert_eq!(compute(&i).score, 5);
        // Platelets alone: below 100 counts, 100 does not.
        let mut i = base();
        i.platelets = Some(99.0);
        assert_eq!(compute(&i).score, 5);
        i.platelets = Some(100.0);
        assert_eq!(compute(&i).score, 2);
    }

    #[test]
    fn missing_inputs_give_a_lower_bound_and_no_category() {
        let i = Inputs {
            age: Some(80.0),
            prior_bleeding: true,
            ..Inputs::default()
        };
        let r = compute(&i);
        assert!(!r.complete);
        assert_eq!(r.missing, vec!["hemoglobin", "egfr", "wbc"]);
        assert_eq!(r.score, 22); // 2 + 12.5 + 7 = 21.5 → 22, a lower bound
        assert_eq!(r.category, None);
        assert_eq!(r.estimated_risk_pct, None);
        assert!(r.risk_text.contains("lower bound"));
        // A zero is a value, not a missing one.
        let mut i = base();
        i.egfr = Some(0.0);
        let r = compute(&i);
        assert!(r.complete);
        assert_eq!(points(&r, "egfr"), 5.5);
    }

    #[test]
    fn egfr_from_creatinine_ckd_epi_2021() {
        // Reference: male, 70 y, Scr 1.2 mg/dL → 65.1.
        let e = ckd_epi_2021(1.2, 70.0, Sex::Male);
        assert!((e - 65.1).abs() < 0.05, "{e}");
        // Female, 60 y, 0.6 mg/dL (below κ = 0.7, the α branch): 102.7.
        let e = ckd_epi_2021(0.6, 60.0, Sex::Female);
        assert!((e - 102.69).abs() < 0.01, "{e}");
        let i = Inputs {
            age: Some(70.0),
            hemoglobin: Some(15.0),
            wbc: Some(3.0),
            creatinine: Some(1.2),
            sex: Some(Sex::Male),
            ..Inputs::default()
        };
        let r = compute(&i);
        assert!(r.complete);
        let c = r.components.iter().find(|c| c.name == "egfr").unwrap();
        assert!(c.derived.is_some());
        // (100 − 65.06) × 0.055 = 1.92; 2 + 10 + 1.92 = 13.92 → 14.
        assert_eq!(r.score, 14);
        // Without sex the eGFR cannot be derived.
        let mut j = i.clone();
        j.sex = None;
        assert_eq!(compute(&j).missing, vec!["egfr"]);
        // A given eGFR wins over creatinine.
        let mut k = i;
        k.egfr = Some(100.0);
        assert_eq!(compute(&k).score, 12);
    }

    #[test]
    fn the_risk_curve_matches_the_reference_points() {
        assert_eq!(estimated_risk_pct(22), 3.78);
        assert_eq!(estimated_risk_pct(27), 6.08);
        assert_eq!(estimated_risk_pct(45), 30.32);
    }

    #[test]
    fn impossible_values_are_refused() {
        let bad = [
            Inputs {
                age: Some(121.0),
                ..Inputs::default()
            },
            Inputs {
                age: Some(-1.0),
                ..Inputs::default()
            },
            Inputs {
                hemoglobin: Some(25.5),
                ..Inputs::default()
            },
            Inputs {
                wbc: Some(501.0),
                ..Inputs::default()
            },
            Inputs {
                egfr: Some(-3.0),
                ..Inputs::default()
            },
            Inputs {
                creatinine: Some(0.0),
                ..Inputs::default()
            },
            Inputs {
                platelets: Some(-5.0),
                ..Inputs::default()
            },
            Inputs {
                hemoglobin: Some(f64::NAN),
                ..Inputs::default()
            },
        ];
        for i in bad {
            assert!(validate(&i).is_err(), "{i:?}");
        }
        assert!(validate(&base()).is_ok());
        let e = validate(&Inputs {
            age: Some(130.0),
            wbc: Some(600.0),
            ..Inputs::default()
        })
        .unwrap_err();
        assert_eq!(
            e.iter().map(|x| x.field).collect::<Vec<_>>(),
            ["age", "wbc"]
        );
    }
}
