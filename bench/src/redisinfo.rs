//! Samples a Redis server's `INFO commandstats` (calls per command, commands run inside
//! functions included), so a run can report the Redis commands it cost per message.
//! One blocking request over a plain socket; loopback only, like every target here.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Calls per command (lower case, e.g. `fcall`, `publish`, `zrange`).
pub type CommandCalls = BTreeMap<String, u64>;

/// Reads `INFO commandstats` from `addr`.
pub fn sample(addr: SocketAddr) -> Result<CommandCalls, String> {
    let err = |e: std::io::Error| format!("redis {addr}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .map_err(err)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    // A bulk string: `$<len>\r\n<body>\r\n`.
    loop {
        let n = s.read(&mut chunk).map_err(err)?;
        if n == 0 {
            return Err(format!("redis {addr}: closed before the reply"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(body) = bulk(&buf)? {
            return Ok(parse(body));
        }
    }
}

fn bulk(buf: &[u8]) -> Result<Option<&str>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..eol]).map_err(|_| "bad reply")?;
    let len: usize = head
        .strip_prefix('$')
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| format!("unexpected reply {head:?}"))?;
    let start = eol + 2;
    if buf.len() < start + len {
        return Ok(None);
    }
    Ok(Some(
        std::str::from_utf8(&buf[start..start + len]).map_err(|_| "bad reply")?,
    ))
}

/// `cmdstat_fcall:calls=12,usec=…` lines → {"fcall": 12}.
fn parse(body: &str) -> CommandCalls {
    body.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

/// Calls made between two samples, without commands that did not move.
pub fn delta(before: &CommandCalls, after: &CommandCalls) -> CommandCalls {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commandstats() {
        let reply = b"$92\r\n# Commandstats\r\ncmdstat_fcall:calls=12,usec=5,usec_per_call=0.4\r\ncmdstat_publish:calls=3,usec=1\r\n\r\n";
        let body = bulk(reply).unwrap().unwrap();
        let calls = parse(body);
        assert_eq!(calls.get("fcall"), Some(&12));
        assert_eq!(calls.get("publish"), Some(&3));
        let mut later = calls.clone();
        later.insert("fcall".into(), 20);
        assert_eq!(
            delta(&calls, &later),
            BTreeMap::from([("fcall".to_string(), 8)])
        );
    }
}
