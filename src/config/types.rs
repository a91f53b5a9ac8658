//! Typed configuration values: durations, rates, byte sizes, address lists and secrets.
//!
//! Every value is parsed once, at start-up, into a type the rest of the code can use
//! without re-checking ("parse, don't validate").

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration as StdDuration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use zeroize::Zeroize;

/// A duration written with a unit: `500ms`, `3s`, `5m`, `12h`, `7d`, `90d`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(StdDuration::from_secs(secs))
    }
    pub const fn from_millis(millis: u64) -> Self {
        Self(StdDuration::from_millis(millis))
    }
    pub const fn from_mins(mins: u64) -> Self {
        Self(StdDuration::from_secs(mins * 60))
    }
    pub const fn from_hours(hours: u64) -> Self {
        Self(StdDuration::from_secs(hours * 3600))
    }
    pub const fn from_days(days: u64) -> Self {
        Self(StdDuration::from_secs(days * 86_400))
    }
    pub const fn std(self) -> StdDuration {
        self.0
    }
    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{s}` has no unit (use ms, s, m, h or d, e.g. `15m`)"))?;
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(format!("`{s}` does not start with a number (e.g. `15m`)"));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}`: the number is too large"))?;
        let millis_per = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "`{s}` has an unknown unit `{unit}` (use ms, s, m, h or d)"
                ));
            }
        };
        let millis = n
            .checked_mul(millis_per)
            .ok_or_else(|| format!("`{s}` is too large"))?;
        Ok(Self(StdDuration::from_millis(millis)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let units: [(u128, &str); 4] = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
        ];
        if ms == 0 {
            return f.write_str("0s");
        }
        for (per, unit) in units {
            if ms.is_multiple_of(per) {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = StringOrNumber::deserialize(d)?;
        match raw {
            StringOrNumber::Str(s) => s.parse().map_err(de::Error::custom),
            StringOrNumber::Num(0) => Ok(Self::default()),
            StringOrNumber::Num(n) => Err(de::Error::custom(format!(
                "`{n}` has no unit (use ms, s, m, h or d, e.g. `{n}s`)"
            ))),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StringOrNumber {
    Str(String),
    Num(u64),
}

/// The period of a rate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Per {
    Second,
    Minute,
    Hour,
}

impl Per {
    pub const fn secs(self) -> u64 {
        match self {
            Per::Second => 1,
            Per::Minute => 60,
            Per::Hour => 3600,
        }
    }
    const fn letter(self) -> char {
        match self {
            Per::Second => 's',
            Per::Minute => 'm',
            Per::Hour => 'h',
        }
    }
}

/// A rate: `N/s`, `N/m` or `N/h`, optionally `N/m burst M`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Rate {
    pub count: u32,
    pub per: Per,
    /// How many requests may arrive at once; defaults to `count`.
    pub burst: u32,
}

impl Rate {
    pub const fn new(count: u32, per: Per, burst: u32) -> Self {
        Self { count, per, burst }
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("`{s}` is not a rate (use `N/s`, `N/m` or `N/h`, optionally `burst M`)");
        let mut words = s.split_whitespace();
        let head = words.next().ok_or_else(bad)?;
        let (count, per) = head.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.parse().map_err(|_| bad())?;
        let per = match per {
            "s" => Per::Second,
            "m" => Per::Minute,
            "h" => Per::Hour,
            _ => return Err(bad()),
        };
        let burst = match (words.next(), words.next(), words.next()) {
            (None, _, _) => count,
            (Some("burst"), Some(b), None) => b.parse().map_err(|_| bad())?,
            _ => return Err(bad()),
        };
        if count == 0 || burst == 0 {
            return Err(format!("`{s}`: a rate must allow at least one request"));
        }
        Ok(Self { count, per, burst })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.per.letter())?;
        if self.burst != self.count {
            write!(f, " burst {}", self.burst)?;
        }
        Ok(())
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A size in bytes: a whole number, or with a unit `KiB`, `MiB`, `KB`, `MB`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (e.g. `1MiB`, `64KiB`, `1048576`)"))?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1024,
            "MiB" => 1024 * 1024,
            "KB" | "kB" => 1000,
            "MB" => 1_000_000,
            other => {
                return Err(format!(
                    "`{s}` has an unknown unit `{other}` (use B, KiB or MiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Self)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 && self.0.is_multiple_of(1024 * 1024) {
            write!(f, "{}MiB", self.0 / (1024 * 1024))
        } else if self.0 != 0 && self.0.is_multiple_of(1024) {
            write!(f, "{}KiB", self.0 / 1024)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StringOrNumber::deserialize(d)? {
            StringOrNumber::Num(n) => Ok(Self(n)),
            StringOrNumber::Str(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

/// A list of networks (`10.0.0.0/8`) or single addresses, from a YAML list or a
/// comma-separated string (the form environment variables use).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct NetList(pub Vec<IpNet>);

impl NetList {
    /// The loopback networks, IPv4 and IPv6.
    pub fn loopback() -> Self {
        Self(vec![
            IpNet::from(IpAddr::from([127, 0, 0, 1])),
            IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
        ])
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        let ip = canonical_ip(*ip);
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) compare as their IPv4 form.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{s}` is not an IP address or CIDR network"))
}

impl Serialize for NetList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|n| n.to_string()))
    }
}

impl<'de> Deserialize<'de> for NetList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items = string_list(d)?;
        items
            .iter()
            .map(|s| parse_net(s))
            .collect::<Result<Vec<_>, _>>()
            .map(NetList)
            .map_err(de::Error::custom)
    }
}

/// A list of strings from a YAML list or a comma-separated string.
pub fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        Str(String),
    }
    Ok(match ListOrString::deserialize(d)? {
        ListOrString::List(v) => v,
        ListOrString::Str(s) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// A secret value. It never prints (`Debug` shows `[REDACTED]`, there is no `Display`),
/// is wiped from memory on drop, and is read with [`Secret::expose`] only where it is used.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

impl Serialize for Secret {
    /// Serialising a secret writes the placeholder, never the value.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[REDACTED]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_every_unit() {
        let cases = [
            ("500ms", 500),
            ("3s", 3_000),
            ("5m", 300_000),
            ("15m", 900_000),
            ("12h", 43_200_000),
            ("7d", 604_800_000),
            ("90d", 7_776_000_000),
            (" 2s ", 2_000),
        ];
        for (s, ms) in cases {
            let d: Duration = s.parse().unwrap();
            assert_eq!(d.0.as_millis(), ms, "{s}");
        }
    }

    #[test]
    fn durations_reject_bad_input() {
        for s in [
            "",
            "5",
            "m",
            "5x",
            "1.5h",
            "-3s",
            "99999999999999999999d",
            "5 m",
        ] {
            assert!(s.parse::<Duration>().is_err(), "{s} should fail");
        }
    }

    #[test]
    fn durations_print_in_their_largest_whole_unit() {
        for s in ["500ms", "3s", "5m", "12h", "90d", "0s", "90s"] {
            assert_eq!(s.parse::<Duration>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rates_parse() {
        assert_eq!("5/s".parse::<Rate>().unwrap(), Rate::new(5, Per::Second, 5));
        assert_eq!(
            "100/m burst 20".parse::<Rate>().unwrap(),
            Rate::new(100, Per::Minute, 20)
        );
        assert_eq!(
            "10/h".parse::<Rate>().unwrap(),
            Rate::new(10, Per::Hour, 10)
        );
        for bad in [
            "5",
            "5/d",
            "0/s",
            "x/s",
            "5/s burst",
            "5/s burst x",
            "5/s bust 3",
            "5/s burst 0",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad} should fail");
        }
        assert_eq!(
            "100/m burst 20".parse::<Rate>().unwrap().to_string(),
            "100/m burst 20"
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1_048_576);
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65_536);
        assert_eq!("1000".parse::<ByteSize>().unwrap().0, 1000);
        assert!("1GB".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn net_lists_accept_lists_and_commas() {
        let l: NetList = serde_json::from_str(r#""10.0.0.0/8, 127.0.0.1""#).unwrap();
        assert!(l.contains(&"10.1.2.3".parse().unwrap()));
        assert!(l.contains(&"127.0.0.1".parse().unwrap()));
        assert!(l.contains(&"::ffff:10.9.9.9".parse().unwrap()));
        assert!(!l.contains(&"192.168.0.1".parse().unwrap()));
        let l: NetList = serde_json::from_str(r#"["::1"]"#).unwrap();
        assert!(l.contains(&"::1".parse().unwrap()));
        assert!(serde_json::from_str::<NetList>(r#""10.0.0.0/33""#).is_err());
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2-canary".into());
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&s).unwrap().contains("hunter2"));
        assert_eq!(s.expose(), "hunter2-canary");
    }
}
