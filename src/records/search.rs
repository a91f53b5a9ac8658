//! Finding people by what others type: names in either order, name prefixes, MRNs and
//! birth dates in the usual forms — over sealed data, through keyed tags only.
//!
//! **Name terms.** Each part of a patient's name (given, family) is folded (Unicode
//! compatibility form, accents dropped, lower case, apostrophes dropped) and split into
//! tokens at anything that is not a letter or a digit (`"O'Brien-Smith"` → `obrien`,
//! `smith`). For each token the index keeps a **token tag** and a **prefix tag** for each
//! prefix of 3 to [`MAX_PREFIX`] letters (the whole token included). A tag is
//! HMAC-SHA256 under a key of its own (derived from key version 1, so it survives
//! rotations) of `(part, kind, text)`, truncated to 96 bits. The rows
//! (`patient_terms`: tag, patient id) hold nothing else.
//!
//! What a database reader learns from them: which patients share a name token, and which
//! share the first 3, 4, … letters of a name part (equal prefixes share a tag), with
//! their counts — so common names and prefixes can be guessed by their frequency, as with
//! any deterministic index. The number of rows per patient follows the length of the
//! name, which the sealed fields' lengths show already. Not the letters themselves, nor
//! which part a tag belongs to, without the keyring.
//!
//! Deliberately not offered: substring (infix) and fuzzy or phonetic matching. Over
//! ciphertext they need n-gram or sound-code indexes that tell a reader far more (a
//! handful of Soundex codes cover most names).
//!
//! **Queries.** [`Query::parse`] reads a search box: a whole value that is a date, a
//! "Family, Given" with a comma, words that are dates (`1961-07-04`, `07/04/1961`,
//! `19610704`, `4.7.1961`), words with digits (identifiers: an MRN), and name words. Every
//! name word and date must match (AND); a term of fewer than 3 letters matches a whole
//! token only.

use std::collections::BTreeSet;

use time::{Date, Month};

use crate::crypto::{self, SharedKeyring};
use crate::phi::envelope::EnvelopeError;

/// The longest prefix with a tag of its own; a longer term is looked up by its first
/// `MAX_PREFIX` letters and checked against the opened name.
pub const MAX_PREFIX: usize = 16;
/// The shortest prefix that is searched as a prefix.
pub const MIN_PREFIX: usize = 3;
/// Hex digits kept of a tag (96 bits).
const TAG_HEX: usize = 24;
const PURPOSE: &str = "custodian/phi/name-terms/v1";

/// A part of a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Given,
    Family,
}

impl Part {
    fn as_str(self) -> &'static str {
        match self {
            Part::Given => "given",
            Part::Family => "family",
        }
    }
}

pub const BOTH: &[Part] = &[Part::Given, Part::Family];

/// Folds text for matching: compatibility form, accents dropped, lower case.
pub fn fold(s: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    use unicode_normalization::char::is_combining_mark;
    s.nfkd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

/// The tokens of a name: folded, apostrophes dropped, split at anything that is not a
/// letter or a digit; each token once, in order.
pub fn tokens(name: &str) -> Vec<String> {
    let folded: String = fold(name)
        .chars()
        .filter(|c| !matches!(c, '\'' | '\u{2019}' | '\u{02bc}'))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for t in folded.split(|c: char| !c.is_alphanumeric()) {
        if !t.is_empty() && !out.iter().any(|o| o == t) {
            out.push(t.to_owned());
        }
    }
    out
}

/// The first `n` characters of `s`.
fn head(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Whether a query term matches a name token: the same token, or (3 letters or more) its
/// beginning.
pub fn term_matches(term: &str, token: &str) -> bool {
    token == term || (term.chars().count() >= MIN_PREFIX && token.starts_with(term))
}

/// Whether every term matches some token of the given parts of a name.
pub fn name_matches(terms: &[String], given: &str, family: &str, parts: &[Part]) -> bool {
    let mut toks: Vec<String> = Vec::new();
    for p in parts {
        toks.extend(tokens(match p {
            Part::Given => given,
            Part::Family => family,
        }));
    }
    terms
        .iter()
        .all(|t| toks.iter().any(|tok| term_matches(t, tok)))
}

/// How well a name answers the name words of a query: for each word, 2 when it is a
/// word of the name (in the parts it may match), 1 when it begins one (3 letters or
/// more); `None` when a word matches nothing.
pub fn score(terms: &[NameTerm], given: &str, family: &str) -> Option<i64> {
    let (g, f) = (tokens(given), tokens(family));
    let mut total = 0;
    for t in terms {
        let mut best = 0;
        for p in t.parts {
            let toks = match p {
                Part::Given => &g,
                Part::Family => &f,
            };
            for tok in toks {
                if *tok == t.text {
                    best = 2;
                } else if best < 1 && term_matches(&t.text, tok) {
                    best = 1;
                }
            }
        }
        if best == 0 {
            return None;
        }
        total += best;
    }
    Some(total)
}

/// The tag keyer: one HMAC key for every name tag.
pub struct Tags<'a> {
    keys: &'a SharedKeyring,
}

impl<'a> Tags<'a> {
    pub fn new(keys: &'a SharedKeyring) -> Self {
        Self { keys }
    }

    fn tag(&self, key: &crypto::Key, part: Part, kind: &str, text: &str) -> String {
        let t = crypto::hmac_sha256(
            key,
            &[part.as_str().as_bytes(), kind.as_bytes(), text.as_bytes()],
        );
        let mut h = crypto::hex(&t);
        h.truncate(TAG_HEX);
        h
    }

    fn key(&self) -> Result<crypto::Key, EnvelopeError> {
        Ok(self
            .keys
            .derive(1, PURPOSE)
            .map_err(crypto::CryptoError::from)?)
    }

    /// The pair tag of two words: their first 3 letters (or the whole word when it is
    /// shorter), in either order, whatever part of the name each is in.
    fn pair_tag(&self, key: &crypto::Key, a: &str, b: &str) -> String {
        let (a, b) = (head(a, MIN_PREFIX), head(b, MIN_PREFIX));
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let t = crypto::hmac_sha256(key, &[b"pair", lo.as_bytes(), hi.as_bytes()]);
        let mut h = crypto::hex(&t);
        h.truncate(TAG_HEX);
        h
    }

    /// Every tag of a patient's name, each once: per word a token tag and its prefix
    /// tags, and per two words of the name a pair tag.
    pub fn of_name(&self, given: &str, family: &str) -> Result<Vec<String>, EnvelopeError> {
        let key = self.key()?;
        let mut out = BTreeSet::new();
        let mut words: Vec<String> = Vec::new();
        for (part, name) in [(Part::Given, given), (Part::Family, family)] {
            for tok in tokens(name) {
                out.insert(self.tag(&key, part, "token", &tok));
                let n = tok.chars().count();
                for k in MIN_PREFIX..=n.min(MAX_PREFIX) {
                    out.insert(self.tag(&key, part, "prefix", head(&tok, k)));
                }
                words.push(tok);
            }
        }
        for (i, a) in words.iter().enumerate() {
            for b in words.iter().skip(i + 1) {
                out.insert(self.pair_tag(&key, a, b));
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The pair tag two query words meet in a name that has both (as two of its words);
    /// `None` when their first letters are the same (one word of the name could then
    /// match both, and no pair stands for it).
    pub fn of_pair(&self, a: &str, b: &str) -> Result<Option<String>, EnvelopeError> {
        if head(a, MIN_PREFIX) == head(b, MIN_PREFIX) {
            return Ok(None);
        }
        let key = self.key()?;
        Ok(Some(self.pair_tag(&key, a, b)))
    }

    /// The tags a query term matches in `parts`: the token's own (an exact match) and,
    /// from 3 letters, its prefix's.
    pub fn of_term(&self, term: &str, parts: &[Part]) -> Result<TermTags, EnvelopeError> {
        let key = self.key()?;
        let n = term.chars().count();
        let exact = parts
            .iter()
            .map(|p| self.tag(&key, *p, "token", term))
            .collect();
        let prefix = if n >= MIN_PREFIX {
            parts
                .iter()
                .map(|p| self.tag(&key, *p, "prefix", head(term, MAX_PREFIX)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(TermTags {
            exact,
            prefix,
            loose: n > MAX_PREFIX,
        })
    }
}

/// The tags of one query term.
#[derive(Clone, Debug)]
pub struct TermTags {
    /// Tags of the whole token (one per part searched).
    pub exact: Vec<String>,
    /// Tags of the term as a prefix (empty under 3 letters).
    pub prefix: Vec<String>,
    /// The term is longer than [`MAX_PREFIX`]: its prefix tag matches more than it, so
    /// the matches must be checked against the opened names.
    pub loose: bool,
}

impl TermTags {
    /// Every tag that matches the term.
    pub fn all(&self) -> Vec<&str> {
        self.exact
            .iter()
            .chain(&self.prefix)
            .map(String::as_str)
            .collect()
    }
}

/// A name word of a query, and the parts it may match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameTerm {
    pub text: String,
    pub parts: &'static [Part],
}

/// A search box's text, read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// The whole text (trimmed), probed as an MRN and (with `phi:ssn`) as an SSN.
    pub whole: String,
    /// Words with digits that are not dates: probed as MRNs.
    pub identifiers: Vec<String>,
    /// A birth date every match must have.
    pub birth_date: Option<Date>,
    /// Name words every match must have.
    pub names: Vec<NameTerm>,
    /// A name word was too short to be a prefix (fewer than 3 letters): it matched whole
    /// tokens only (the pages say so).
    pub short_terms: bool,
}

const GIVEN: &[Part] = &[Part::Given];
const FAMILY: &[Part] = &[Part::Family];

impl Query {
    /// Reads a search box. `today` decides the century of a two-digit year (the latest
    /// that is not in the future).
    pub fn parse(text: &str, today: Date) -> Self {
        let whole = text.trim().to_owned();
        let mut q = Query {
            whole: whole.clone(),
            ..Query::default()
        };
        if whole.is_empty() {
            return q;
        }
        // A date written with spaces ("4 July 1961", "July 4, 1961") is the whole value.
        if let Some(d) = parse_birth_date(&whole, today) {
            q.birth_date = Some(d);
            return q;
        }
        // "Family, Given": the comma says which part is which.
        let (family_words, given_words, parts): (&str, &str, [&'static [Part]; 2]) =
            match whole.split_once(',') {
                Some((f, g)) => (f, g, [FAMILY, GIVEN]),
                None => (whole.as_str(), "", [BOTH, BOTH]),
            };
        for (words, parts) in [(family_words, parts[0]), (given_words, parts[1])] {
            for word in words.split_whitespace() {
                if let Some(d) = parse_birth_date(word, today) {
                    q.birth_date = Some(d);
                } else if word.chars().any(|c| c.is_ascii_digit()) {
                    q.identifiers.push(word.to_ascii_uppercase());
                } else {
                    for t in tokens(word) {
                        if t.chars().count() < MIN_PREFIX {
                            q.short_terms = true;
                        }
                        if !q.names.iter().any(|n| n.text == t && n.parts == parts) {
                            q.names.push(NameTerm { text: t, parts });
                        }
                    }
                }
            }
        }
        q
    }

    /// Whether anything beyond the whole-value probes is asked.
    pub fn has_criteria(&self) -> bool {
        self.birth_date.is_some() || !self.names.is_empty()
    }
}

/// A birth date as people type it: `1961-07-04`, `1961/07/04`, `19610704`, `07/04/1961`
/// and `7/4/61` (month first, as in the US), `04.07.1961` (day first, with dots),
/// `4 Jul 1961`, `4 July 1961`, `Jul 4, 1961`, `July 4 1961`. A two-digit year is the
/// latest such year not after `today`. Anything else, or an impossible date, is `None`.
pub fn parse_birth_date(s: &str, today: Date) -> Option<Date> {
    let s = s.trim();
    let num = |t: &str| -> Option<u32> {
        (!t.is_empty() && t.len() <= 4 && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let year = |t: &str| -> Option<i32> {
        let y = i32::try_from(num(t)?).ok()?;
        match t.len() {
            4 => Some(y),
            2 => {
                let century = today.year() - today.year() % 100;
                Some(if century + y <= today.year() {
                    century + y
                } else {
                    century - 100 + y
                })
            }
            _ => None,
        }
    };
    let ymd = |y: i32, m: u32, d: u32| -> Option<Date> {
        let month = Month::try_from(u8::try_from(m).ok()?).ok()?;
        Date::from_calendar_date(y, month, u8::try_from(d).ok()?).ok()
    };
    // Eight digits: YYYYMMDD.
    if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) {
        return ymd(
            s[..4].parse().ok()?,
            s[4..6].parse().ok()?,
            s[6..].parse().ok()?,
        );
    }
    for sep in ['-', '/', '.'] {
        let parts: Vec<&str> = s.split(sep).collect();
        if let [a, b, c] = parts.as_slice() {
            if a.len() == 4 {
                return ymd(year(a)?, num(b)?, num(c)?);
            }
            // Month first with - and /, day first with dots.
            return match sep {
                '.' => ymd(year(c)?, num(b)?, num(a)?),
                _ => ymd(year(c)?, num(a)?, num(b)?),
            };
        }
    }
    // With a month's name.
    let words: Vec<&str> = s
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    let month = |w: &str| -> Option<u32> {
        let w = w.to_ascii_lowercase();
        const NAMES: [&str; 12] = [
            "january",
            "february",
            "march",
            "april",
            "may",
            "june",
            "july",
            "august",
            "september",
            "october",
            "november",
            "december",
        ];
        if w.len() < 3 {
            return None;
        }
        NAMES
            .iter()
            .position(|n| n.starts_with(w.trim_end_matches('.')))
            .and_then(|i| u32::try_from(i + 1).ok())
    };
    match words.as_slice() {
        [d, m, y] if num(d).is_some() => ymd(year(y)?, month(m)?, num(d)?),
        [m, d, y] => ymd(year(y)?, month(m)?, num(d)?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    const TODAY: Date = date!(2026 - 12 - 06);

    #[test]
    fn names_fold_to_tokens() {
        assert_eq!(tokens("  José  María "), ["jose", "maria"]);
        assert_eq!(tokens("O'Brien-Smith"), ["obrien", "smith"]);
        assert_eq!(tokens("D’Angelo"), ["dangelo"]);
        assert_eq!(tokens("ＡＤＡ"), ["ada"], "compatibility forms");
        assert_eq!(tokens("Ann ann"), ["ann"]);
        assert!(tokens(" - ").is_empty());
    }

    #[test]
    fn terms_match_tokens_or_their_beginning_from_three_letters() {
        assert!(term_matches("gar", "garcia"));
        assert!(term_matches("garcia", "garcia"));
        assert!(!term_matches("ga", "garcia"), "too short to be a prefix");
        assert!(term_matches("li", "li"));
        assert!(!term_matches("arc", "garcia"), "no infix");
        let terms = vec!["jane".to_owned(), "do".to_owned()];
        assert!(name_matches(&terms, "Jane", "Do", BOTH));
        assert!(!name_matches(&terms, "Jane", "Doe", BOTH));
        assert!(!name_matches(&terms, "Jane", "Do", &[Part::Given]));
    }

    #[test]
    fn names_are_scored_word_by_word() {
        let q = Query::parse("jane doe", TODAY);
        assert_eq!(score(&q.names, "Jane", "Doe"), Some(4));
        assert_eq!(score(&q.names, "Janet", "Doerr"), Some(2));
        assert_eq!(score(&q.names, "Jane", "Dowling"), None);
        assert_eq!(score(&q.names, "Doe", "Jane"), Some(4), "either order");
        let q = Query::parse("Doe, Jane", TODAY);
        assert_eq!(
            score(&q.names, "Doe", "Jane"),
            None,
            "the comma says which part"
        );
        assert_eq!(score(&q.names, "Jane", "Doe"), Some(4));
        let q = Query::parse("ann anna", TODAY);
        assert_eq!(
            score(&q.names, "Anna", "Smith"),
            Some(3),
            "one word may answer both"
        );
    }

    #[test]
    fn queries_are_read_as_people_type_them() {
        let q = Query::parse("Jane Doe", TODAY);
        assert_eq!(
            q.names.iter().map(|n| n.text.as_str()).collect::<Vec<_>>(),
            ["jane", "doe"]
        );
        assert!(q.names.iter().all(|n| n.parts == BOTH));
        let q = Query::parse("Doe, Jane", TODAY);
        assert_eq!(q.names[0].parts, FAMILY);
        assert_eq!(q.names[1].parts, GIVEN);
        let q = Query::parse("smith 07/04/1961", TODAY);
        assert_eq!(q.birth_date, Some(date!(1961 - 07 - 04)));
        assert_eq!(q.names.len(), 1);
        let q = Query::parse("4 July 1961", TODAY);
        assert_eq!(q.birth_date, Some(date!(1961 - 07 - 04)));
        assert!(q.names.is_empty());
        let q = Query::parse("MRN-000123", TODAY);
        assert_eq!(q.identifiers, ["MRN-000123"]);
        assert!(q.names.is_empty() && q.birth_date.is_none());
        assert_eq!(q.whole, "MRN-000123");
        let q = Query::parse("Do", TODAY);
        assert!(q.short_terms);
        assert!(!Query::parse("   ", TODAY).has_criteria());
    }

    #[test]
    fn birth_dates_in_the_common_forms() {
        let d = date!(1961 - 07 - 04);
        for s in [
            "1961-07-04",
            "1961/07/04",
            "1961.7.4",
            "19610704",
            "07/04/1961",
            "7/4/1961",
            "7/4/61",
            "07-04-1961",
            "04.07.1961",
            "4 Jul 1961",
            "4 July 1961",
            "Jul 4, 1961",
            "July 4 1961",
            "jul. 4, 1961",
        ] {
            assert_eq!(parse_birth_date(s, TODAY), Some(d), "{s}");
        }
        assert_eq!(
            parse_birth_date("1/2/26", TODAY),
            Some(date!(2026 - 01 - 02))
        );
        assert_eq!(
            parse_birth_date("1/2/27", TODAY),
            Some(date!(1927 - 01 - 02)),
            "not in the future"
        );
        for s in [
            "1961-02-30",
            "13/01/1961",
            "1961",
            "Ju 4 1961",
            "4 Foo 1961",
            "1961-07-04-01",
            "",
            "garcia",
            "123456789",
        ] {
            assert_eq!(parse_birth_date(s, TODAY), None, "{s}");
        }
    }
}
