//! The PROXY protocol header (HAProxy's v1 text or v2 binary form) that a load
//! balancer puts before the client's HTTP request, so the gateway learns the client's
//! address instead of the balancer's. Parsed with `ppp`; honoured only from the
//! addresses in `proxy_trusted` (the connection code checks the peer first).

use std::net::IpAddr;

use ppp::PartialResult;
use serde::Deserialize;

/// Which header the client listener expects (`proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    /// No header: the peer is the client.
    Off,
    /// `PROXY TCP4 <client> <server> <port> <port>\r\n`.
    V1,
    /// The binary header (HAProxy `send-proxy-v2`).
    V2,
}

/// Room allowed for the header on top of `max_header_bytes` (v1 is at most 107
/// bytes; v2 carries TLVs).
pub const MAX_HEADER: usize = 1024;

/// What the bytes received so far hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxied {
    /// Not all of the header yet.
    Partial,
    /// The header is `len` bytes; the client is `client` (`None`: the header names no
    /// address, as a balancer's own health check does, and the peer stands).
    Header { len: usize, client: Option<IpAddr> },
    /// Not a header of the expected version, or one that is too long.
    Bad,
}

/// Parses the header at the start of `buf`.
pub fn parse(buf: &[u8], version: ProxyProtocol) -> Proxied {
    let proxied = match version {
        ProxyProtocol::Off => {
            return Proxied::Header {
                len: 0,
                client: None,
            }
        }
        ProxyProtocol::V1 => match ppp::v1::Header::try_from(buf) {
            Ok(h) => Proxied::Header {
                len: h.header.len(),
                client: match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => Some(a.source_address.into()),
                    ppp::v1::Addresses::Tcp6(a) => Some(a.source_address.into()),
                    ppp::v1::Addresses::Unknown => None,
                },
            },
            // `ppp` calls a line with parts missing incomplete even when its end has
            // come; with the line ended, no more bytes can mend it.
            Err(e) if e.is_incomplete() && !buf.contains(&b'\n') => Proxied::Partial,
            Err(_) => Proxied::Bad,
        },
        ProxyProtocol::V2 => match ppp::v2::Header::try_from(buf) {
            Ok(h) => Proxied::Header {
                len: h.len(),
                client: match (h.command, h.addresses) {
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                        Some(a.source_address.into())
                    }
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                        Some(a.source_address.into())
                    }
                    _ => None,
                },
            },
            Err(e) if e.is_incomplete() => Proxied::Partial,
            Err(_) => Proxied::Bad,
        },
    };
    match proxied {
        Proxied::Partial if buf.len() >= MAX_HEADER => Proxied::Bad,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend((addresses.len() as u16).to_be_bytes());
        h.extend(addresses);
        h
    }

    #[test]
    fn v1_gives_the_client_address_and_the_header_length() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 55555 443\r\n";
        let mut buf = line.to_vec();
        buf.extend(b"GET /ws HTTP/1.1\r\n");
        assert_eq!(
            parse(&buf, ProxyProtocol::V1),
            Proxied::Header {
                len: line.len(),
                client: Some("203.0.113.7".parse().unwrap())
            }
        );
        assert_eq!(parse(&line[..20], ProxyProtocol::V1), Proxied::Partial);
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n", ProxyProtocol::V1),
            Proxied::Header {
                len: 15,
                client: None
            }
        );
        assert_eq!(
            parse(b"GET /ws HTTP/1.1\r\n", ProxyProtocol::V1),
            Proxied::Bad
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3\r\n", ProxyProtocol::V1),
            Proxied::Bad
        );
    }

    #[test]
    fn v2_gives_the_client_address_and_a_local_command_keeps_the_peer() {
        let addrs = [198, 51, 100, 9, 10, 0, 0, 1, 0xd4, 0x31, 0x01, 0xbb];
        let mut buf = v2(1, 0x11, &addrs);
        let len = buf.len();
        buf.extend(b"GET");
        assert_eq!(
            parse(&buf, ProxyProtocol::V2),
            Proxied::Header {
                len,
                client: Some("198.51.100.9".parse().unwrap())
            }
        );
        assert_eq!(parse(&buf[..14], ProxyProtocol::V2), Proxied::Partial);
        let local = v2(0, 0x00, &[]);
        assert_eq!(
            parse(&local, ProxyProtocol::V2),
            Proxied::Header {
                len: 16,
                client: None
            }
        );
        // A v1 header where v2 is expected, and plain HTTP, are refused.
        assert_eq!(
            parse(
                b"PROXY TCP4 203.0.113.7 10.0.0.1 55555 443\r\n",
                ProxyProtocol::V2
            ),
            Proxied::Bad
        );
        assert_eq!(
            parse(b"GET /ws HTTP/1.1\r\nHost: x\r\n", ProxyProtocol::V2),
            Proxied::Bad
        );
    }

    #[test]
    fn a_header_that_never_ends_is_refused() {
        let mut buf = b"PROXY TCP4 ".to_vec();
        buf.resize(MAX_HEADER, b'1');
        assert_eq!(parse(&buf, ProxyProtocol::V1), Proxied::Bad);
        // v2 announcing more address bytes than the room allowed.
        let mut big = v2(1, 0x11, &[]);
        big[14..16].copy_from_slice(&2000u16.to_be_bytes());
        big.resize(MAX_HEADER, 0);
        assert_eq!(parse(&big, ProxyProtocol::V2), Proxied::Bad);
    }
}
