//! Where webhooks may go (SSRF checks, protocol section 6.2): `https` to public addresses; with
//! the development switch also `http://localhost` and `http://127.0.0.x`. Checked when a
//! subscription is created and again at every delivery, where names are resolved by a resolver
//! that drops refused addresses (so a name that points at a private address later still cannot
//! reach it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Longest webhook URL accepted.
pub const MAX_URL_BYTES: usize = 2048;

/// Checks a webhook URL; the error says why it was refused.
pub fn check(url: &str, allow_local: bool) -> Result<Url, String> {
    if url.len() > MAX_URL_BYTES {
        return Err(format!("url is longer than {MAX_URL_BYTES} bytes"));
    }
    let parsed = Url::parse(url).map_err(|e| format!("not a valid url: {e}"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("url must not carry credentials".into());
    }
    let host = parsed.host().ok_or("url has no host")?;
    let local_dev = allow_local
        && match &host {
            url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
            url::Host::Ipv4(ip) => is_dev_loopback(IpAddr::V4(*ip)),
            url::Host::Ipv6(_) => false,
        };
    match parsed.scheme() {
        "https" => {}
        "http" if local_dev => {}
        "http" => {
            return Err(
                "webhook urls must use https (http only for localhost and 127.0.0.x with \
                 DS_SUBSCRIPTIONS__ALLOW_LOCAL_WEBHOOKS)"
                    .into(),
            );
        }
        other => return Err(format!("scheme {other:?} is not allowed; use https")),
    }
    match host {
        url::Host::Ipv4(ip) => allowed_ip(IpAddr::V4(ip), local_dev),
        url::Host::Ipv6(ip) => allowed_ip(IpAddr::V6(ip), false),
        url::Host::Domain(d) if d.eq_ignore_ascii_case("localhost") && !local_dev => {
            Err("localhost is a local network target".into())
        }
        url::Host::Domain(_) => Ok(()),
    }
    .map(|()| parsed)
}

fn allowed_ip(ip: IpAddr, local_dev: bool) -> Result<(), String> {
    if local_dev && is_dev_loopback(ip) {
        return Ok(());
    }
    if is_public(ip) {
        Ok(())
    } else {
        Err(format!(
            "{ip} is a private, loopback, link-local or otherwise local network target"
        ))
    }
}

/// `127.0.0.x`: the development exception of section 6.2.
fn is_dev_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == [127, 0, 0],
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST,
    }
}

/// Whether `ip` is a globally routable unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) reaches the embedded IPv4 address.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || s[..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible and the rest of ::/96
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24, protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15, benchmarking
        || o[0] >= 240) // reserved
}

/// Resolves webhook host names, dropping every address a webhook may not reach.
pub struct GuardedResolver {
    pub allow_local: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let local_dev = self.allow_local && host.eq_ignore_ascii_case("localhost");
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| is_public(a.ip()) || (local_dev && is_dev_loopback(a.ip())))
                .collect();
            if allowed.is_empty() {
                return Err(format!(
                    "{host} resolves only to local network addresses, which webhooks may not reach"
                )
                .into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_local_targets_are_refused() {
        for url in [
            "http://10.0.0.1/hook",
            "https://10.0.0.1/hook",
            "https://192.168.1.1/",
            "https://172.16.0.1/",
            "https://169.254.169.254/latest/meta-data",
            "https://127.0.0.1/",
            "https://[::1]/",
            "https://[fd00::1]/",
            "https://[fe80::1]/",
            "https://[::ffff:10.0.0.1]/",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://localhost/",
            "ftp://example.com/",
            "https://user:pw@example.com/",
        ] {
            assert!(check(url, false).is_err(), "{url} should be refused");
        }
    }

    /// The guard at delivery time: a name that resolves to loopback (as a public name
    /// re-pointed at an internal address would) yields no address to connect to.
    #[tokio::test]
    async fn names_resolving_to_local_addresses_are_dropped_at_delivery_time() {
        let name = |n: &str| n.parse::<Name>().expect("a host name");
        let refused = GuardedResolver { allow_local: false }
            .resolve(name("localhost"))
            .await;
        let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("local network addresses"),
            "localhost must not resolve for webhooks: {message:?}"
        );
        let allowed: Vec<SocketAddr> = GuardedResolver { allow_local: true }
            .resolve(name("localhost"))
            .await
            .map(|addrs| addrs.collect())
            .unwrap_or_default();
        assert!(
            !allowed.is_empty(),
            "the development switch allows localhost"
        );
        assert!(
            allowed.iter().all(|a| is_dev_loopback(a.ip())),
            "{allowed:?}"
        );
    }

    #[test]
    fn public_https_is_allowed() {
        assert!(check("https://example.com/hooks", false).is_ok());
        assert!(check("https://93.184.216.34/hooks", false).is_ok());
        assert!(check("http://example.com/hooks", false).is_err());
    }

    #[test]
    fn the_development_switch_allows_only_localhost_and_127_0_0_x() {
        assert!(check("http://localhost:8080/hook", true).is_ok());
        assert!(check("http://127.0.0.1:8080/hook", true).is_ok());
        assert!(check("http://127.0.0.9/hook", true).is_ok());
        assert!(check("http://127.0.1.1/hook", true).is_err());
        assert!(check("http://10.0.0.1/hook", true).is_err());
        assert!(check("http://example.com/hook", true).is_err());
        assert!(check("http://127.0.0.1:8080/hook", false).is_err());
    }
}
