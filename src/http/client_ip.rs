//! The client address: the TCP peer, or — only when the peer is a trusted proxy — the
//! nearest address in `X-Forwarded-For` that is not itself a trusted proxy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;

use crate::config::NetList;
use crate::config::types::canonical_ip;

/// The client's IP address as this server believes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// The network a client address counts under, for throttles and rate limits: an IPv4
/// address alone, an IPv6 address by its /64 (one subscriber's usual allocation, so
/// that walking through the addresses of one's own /64 does not reset a count).
pub fn network_key(ip: IpAddr) -> String {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{net}/64")
        }
    }
}

/// [`network_key`] of an address held as text (as the sign-in records keep it).
pub fn network_key_of(ip: &str) -> String {
    ip.parse::<IpAddr>()
        .map_or_else(|_| ip.to_owned(), network_key)
}

/// Picks the client address from the peer and the `X-Forwarded-For` values.
pub fn resolve(peer: IpAddr, forwarded_for: &[&str], trusted: &NetList) -> IpAddr {
    let peer = canonical_ip(peer);
    if !trusted.contains(&peer) {
        return peer;
    }
    // Walk from the nearest hop outwards; the first untrusted address is the client.
    let hops: Vec<&str> = forwarded_for
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                let ip = canonical_ip(ip);
                client = ip;
                if !trusted.contains(&ip) {
                    break;
                }
            }
            // A malformed hop ends the walk: nothing beyond it can be trusted.
            Err(_) => break,
        }
    }
    client
}

pub async fn middleware(
    axum::extract::State(trusted): axum::extract::State<std::sync::Arc<NetList>>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let forwarded: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let ip = resolve(peer, &forwarded, &trusted);
    req.extensions_mut().insert(ClientIp(ip));
    next.run(req).await
}

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<ClientIp>()
            .copied()
            .unwrap_or(ClientIp(IpAddr::V4(Ipv4Addr::UNSPECIFIED))))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_ipv6_client_counts_by_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(network_key(a), network_key(b));
        assert_eq!(network_key(a), "2001:db8:1:2::/64");
        assert_ne!(network_key(a), network_key(other));
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(network_key(v4), "203.0.113.7");
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(network_key(mapped), "203.0.113.7");
        assert_eq!(network_key_of("::ffff:203.0.113.8"), "203.0.113.8");
        assert_eq!(network_key_of("not an address"), "not an address");
    }

    use super::*;

    fn nets(s: &str) -> NetList {
        serde_json::from_value(serde_json::Value::String(s.into())).unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_the_header_says() {
        assert_eq!(
            resolve(ip("203.0.113.9"), &["1.2.3.4"], &NetList::default()),
            ip("203.0.113.9")
        );
        // Loopback is not trusted unless listed.
        assert_eq!(
            resolve(ip("127.0.0.1"), &["1.2.3.4"], &NetList::default()),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn trusted_proxy_forwards_the_nearest_untrusted_hop() {
        let t = nets("10.0.0.0/8");
        assert_eq!(
            resolve(ip("10.0.0.2"), &["198.51.100.7"], &t),
            ip("198.51.100.7")
        );
        // A client-forged left-most entry is ignored: the right-most untrusted one wins.
        assert_eq!(
            resolve(ip("10.0.0.2"), &["6.6.6.6, 198.51.100.7"], &t),
            ip("198.51.100.7")
        );
        // Chains of trusted proxies are skipped, across several header lines too.
        assert_eq!(
            resolve(ip("10.0.0.2"), &["198.51.100.7", "10.0.0.5"], &t),
            ip("198.51.100.7")
        );
        // No header: the proxy itself.
        assert_eq!(resolve(ip("10.0.0.2"), &[], &t), ip("10.0.0.2"));
        // Garbage stops the walk at the last good hop.
        assert_eq!(
            resolve(ip("10.0.0.2"), &["1.1.1.1, junk, 10.0.0.7"], &t),
            ip("10.0.0.7")
        );
        // IPv4-mapped peers match IPv4 networks.
        assert_eq!(
            resolve(ip("::ffff:10.0.0.2"), &["198.51.100.7"], &t),
            ip("198.51.100.7")
        );
    }
}
