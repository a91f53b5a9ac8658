//! Query parameters that carry their own rules: page sizes, bounded text, times.
//!
//! Each type checks its value while the query string is parsed and states the same
//! rule in its OpenAPI schema (`minimum`/`maximum`/`default`, `maxLength`, `format`),
//! from one place, so the document and the server cannot drift apart. A value that
//! breaks the rule is a 422 naming the parameter (see `json::parse_query`).

use std::borrow::Cow;

use serde::{Deserialize, Deserializer};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::{RefOr, schema::SchemaType};

/// A page size from 1 to `MAX`, `DEFAULT` when absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit<const MAX: u32, const DEFAULT: u32>(u32);

impl<const MAX: u32, const DEFAULT: u32> Limit<MAX, DEFAULT> {
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl<const MAX: u32, const DEFAULT: u32> Default for Limit<MAX, DEFAULT> {
    fn default() -> Self {
        Self(DEFAULT)
    }
}

impl<'de, const MAX: u32, const DEFAULT: u32> Deserialize<'de> for Limit<MAX, DEFAULT> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        match u32::try_from(n) {
            Ok(n) if (1..=MAX).contains(&n) => Ok(Self(n)),
            // `!`: a message of our own, safe to show (see `json::sanitize`).
            _ => Err(serde::de::Error::custom(format!(
                "!must be between 1 and {MAX}"
            ))),
        }
    }
}

impl<const MAX: u32, const DEFAULT: u32> utoipa::PartialSchema for Limit<MAX, DEFAULT> {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::new(Type::Integer))
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
            .minimum(Some(1))
            .maximum(Some(MAX))
            .default(Some(DEFAULT.into()))
            .description(Some(format!("Page size, 1–{MAX} (default {DEFAULT}).")))
            .into()
    }
}

impl<const MAX: u32, const DEFAULT: u32> utoipa::ToSchema for Limit<MAX, DEFAULT> {
    fn name() -> Cow<'static, str> {
        Cow::Owned(format!("Limit{MAX}"))
    }
}

/// Text of at most `MAX` characters (e.g. a search term).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Text<const MAX: usize>(String);

impl<const MAX: usize> Text<MAX> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for Text<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.chars().count() > MAX {
            return Err(serde::de::Error::custom(format!(
                "!must be at most {MAX} characters"
            )));
        }
        Ok(Self(s))
    }
}

impl<const MAX: usize> utoipa::PartialSchema for Text<MAX> {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::new(Type::String))
            .max_length(Some(MAX))
            .into()
    }
}

impl<const MAX: usize> utoipa::ToSchema for Text<MAX> {
    fn name() -> Cow<'static, str> {
        Cow::Owned(format!("Text{MAX}"))
    }
}

/// An RFC 3339 time (`2026-01-31T00:00:00Z`), kept as the fixed-width timestamp the
/// store compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Time(String);

impl Time {
    pub fn into_timestamp(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::clock::parse_rfc3339(&s).map(Self).ok_or_else(|| {
            serde::de::Error::custom("!must be an RFC 3339 time, e.g. 2026-01-31T00:00:00Z")
        })
    }
}

impl utoipa::PartialSchema for Time {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::new(Type::String))
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .into()
    }
}

impl utoipa::ToSchema for Time {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Time")
    }
}
