//! What Redis Cluster asks of a client, without any I/O: the hash slot of a key (hash
//! tags included), the slot map read from `CLUSTER SHARDS`, and the `MOVED` / `ASK`
//! redirections a server answers with when a slot lives elsewhere.
//!
//! A cluster splits its keys (and its sharded pub/sub channels) over 16,384 slots, each
//! served by one master. A command's keys must all be in one slot; a key's slot is the
//! CRC16 of the key, or of its hash tag: the part between the first `{` and the first
//! `}` after it, when that part is not empty. So `ringway:history:{news}` and
//! `ringway:epoch:{news}` share a slot, and one function call can touch both.

use redis_protocol::resp2::types::BytesFrame;

use super::url::Addr;

/// Hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the checksum Redis Cluster
/// takes of keys, one table lookup per byte.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

/// The part of `key` that decides its slot: its hash tag if it has a non-empty one,
/// else the whole key.
pub fn hashed_part(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The hash slot of `key` (or of a sharded pub/sub channel).
pub fn slot(key: &[u8]) -> u16 {
    crc16(hashed_part(key)) % SLOTS as u16
}

/// One master of the cluster and the replicas that follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    /// The node id Redis gave it (40 hex characters).
    pub id: String,
    pub addr: Addr,
    pub replicas: Vec<Addr>,
}

/// Which master serves each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    pub masters: Vec<Master>,
    /// Per slot, an index into `masters`, or `NONE` for a slot no master serves.
    owner: Box<[u16]>,
}

const NONE: u16 = u16::MAX;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterError {
    #[error("CLUSTER SHARDS answered something other than its documented form: {0}")]
    Shape(&'static str),
    #[error("a shard serves slots {start}-{end}, beyond the last slot (16383)")]
    SlotRange { start: i64, end: i64 },
    #[error("slots {0} and on are served by no master the cluster knows as online")]
    Uncovered(u16),
}

impl SlotMap {
    /// Reads the answer to `CLUSTER SHARDS` (Redis 7.0 and later): each shard's slot
    /// ranges and nodes, of which the online master serves the slots. A shard with no
    /// online master (mid-failover) leaves its slots unserved; `check_covered` says so.
    ///
    /// With `tls`, each node's `tls-port` is the one to reach it at, else its `port`.
    pub fn from_shards(reply: &BytesFrame, tls: bool) -> Result<Self, ClusterError> {
        let BytesFrame::Array(shards) = reply else {
            return Err(ClusterError::Shape("not an array of shards"));
        };
        let mut map = Self {
            masters: Vec::new(),
            owner: vec![NONE; SLOTS].into_boxed_slice(),
        };
        for shard in shards {
            let fields = pairs(shard).ok_or(ClusterError::Shape("a shard is not a map"))?;
            let ranges = match field(&fields, "slots") {
                Some(BytesFrame::Array(r)) => r,
                _ => return Err(ClusterError::Shape("a shard has no slots array")),
            };
            let Some(BytesFrame::Array(nodes)) = field(&fields, "nodes") else {
                return Err(ClusterError::Shape("a shard has no nodes array"));
            };
            let mut master = None;
            let mut replicas = Vec::new();
            for node in nodes {
                let node = pairs(node).ok_or(ClusterError::Shape("a node is not a map"))?;
                let Some(addr) = node_addr(&node, tls) else {
                    continue; // no address to reach it at (yet)
                };
                let online = text(field(&node, "health")) == Some("online");
                match text(field(&node, "role")) {
                    Some("master") if online => {
                        let id = text(field(&node, "id")).unwrap_or_default().to_owned();
                        master = Some(Master {
                            id,
                            addr,
                            replicas: Vec::new(),
                        });
                    }
                    Some("replica") if online => replicas.push(addr),
                    _ => {}
                }
            }
            // A master serving no slot (a node that is joining, or one about to become
            // a replica) has nothing to be asked.
            let Some(mut master) = master.filter(|_| !ranges.is_empty()) else {
                continue;
            };
            master.replicas = replicas;
            let index = map.masters.len() as u16;
            for range in ranges.chunks(2) {
                let (start, end) = match range {
                    [BytesFrame::Integer(s), BytesFrame::Integer(e)] => (*s, *e),
                    _ => return Err(ClusterError::Shape("a slot range is not two integers")),
                };
                if start < 0 || end < start || end >= SLOTS as i64 {
                    return Err(ClusterError::SlotRange { start, end });
                }
                map.owner[start as usize..=end as usize].fill(index);
            }
            map.masters.push(master);
        }
        Ok(map)
    }

    /// One server serving every slot: a Redis that is not a cluster.
    pub fn single(addr: Addr) -> Self {
        Self {
            masters: vec![Master {
                id: String::new(),
                addr,
                replicas: Vec::new(),
            }],
            owner: vec![0; SLOTS].into_boxed_slice(),
        }
    }

    /// The master serving `slot`, if one does.
    pub fn master_of(&self, slot: u16) -> Option<&Master> {
        self.master_index(slot).map(|i| &self.masters[i])
    }

    /// Index into `masters` of the master serving `slot`.
    pub fn master_index(&self, slot: u16) -> Option<usize> {
        let index = *self.owner.get(usize::from(slot))?;
        (index != NONE).then_some(usize::from(index))
    }

    /// Every slot is served: otherwise the first slot that is not.
    pub fn check_covered(&self) -> Result<(), ClusterError> {
        match self.owner.iter().position(|&o| o == NONE) {
            Some(s) => Err(ClusterError::Uncovered(s as u16)),
            None => Ok(()),
        }
    }

    /// Points `slot` at the master at `addr` (a `MOVED` answer), adding the master if
    /// the map did not know it. The rest of the map may be stale too; the caller reads
    /// the whole map again soon after.
    pub fn moved(&mut self, slot: u16, addr: &Addr) {
        let index = match self.masters.iter().position(|m| &m.addr == addr) {
            Some(i) => i,
            None => {
                self.masters.push(Master {
                    id: String::new(),
                    addr: addr.clone(),
                    replicas: Vec::new(),
                });
                self.masters.len() - 1
            }
        };
        if let Some(o) = self.owner.get_mut(usize::from(slot)) {
            *o = index as u16;
        }
    }
}

/// A server's answer that a key's slot is served elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// `MOVED <slot> <host>:<port>`: the slot has moved for good; ask there from now on.
    Moved { slot: u16, addr: Addr },
    /// `ASK <slot> <host>:<port>`: the slot is being migrated; ask there once, after
    /// `ASKING`, and keep asking here for the rest.
    Ask { slot: u16, addr: Addr },
}

impl Redirect {
    /// Reads an error reply's text; `None` when it is not a redirection.
    pub fn parse(error: &str) -> Option<Self> {
        let mut words = error.split(' ');
        let kind = words.next()?;
        let slot: u16 = words.next()?.parse().ok()?;
        let endpoint = words.next()?;
        if words.next().is_some() || usize::from(slot) >= SLOTS {
            return None;
        }
        let (host, port) = endpoint.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addr = Addr {
            host: host.to_owned(),
            port: port.parse().ok()?,
        };
        match kind {
            "MOVED" => Some(Self::Moved { slot, addr }),
            "ASK" => Some(Self::Ask { slot, addr }),
            _ => None,
        }
    }
}

/// A RESP2 map (a flat array of name, value, name, value…) as pairs.
fn pairs(frame: &BytesFrame) -> Option<Vec<(&[u8], &BytesFrame)>> {
    let BytesFrame::Array(items) = frame else {
        return None;
    };
    items
        .chunks(2)
        .map(|kv| match kv {
            [BytesFrame::BulkString(k) | BytesFrame::SimpleString(k), v] => Some((&k[..], v)),
            _ => None,
        })
        .collect()
}

fn field<'a>(pairs: &[(&[u8], &'a BytesFrame)], name: &str) -> Option<&'a BytesFrame> {
    pairs
        .iter()
        .find(|(k, _)| *k == name.as_bytes())
        .map(|(_, v)| *v)
}

fn text(frame: Option<&BytesFrame>) -> Option<&str> {
    match frame? {
        BytesFrame::BulkString(b) | BytesFrame::SimpleString(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

/// Where to reach a node: its `endpoint` (what `cluster-preferred-endpoint-type` says
/// clients should use), else its `ip`; and its `port`, or its `tls-port` for TLS.
fn node_addr(node: &[(&[u8], &BytesFrame)], tls: bool) -> Option<Addr> {
    let host = [text(field(node, "endpoint")), text(field(node, "ip"))]
        .into_iter()
        .flatten()
        .find(|h| !h.is_empty() && *h != "?")?;
    let port = match field(node, if tls { "tls-port" } else { "port" })? {
        BytesFrame::Integer(p) => u16::try_from(*p).ok()?,
        _ => return None,
    };
    Some(Addr {
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn slots_are_those_redis_gives() {
        // The CRC16 check value, and `CLUSTER KEYSLOT` answers of a real server.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"somekey"), 11058);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"foo{hash_tag}"), 2515);
        assert_eq!(slot(b"bar{hash_tag}"), 2515);
        assert_eq!(slot(b"ringway:history:{news}"), 5161);
        assert_eq!(slot(b"foo{{bar}}zap"), 4015);
        assert_eq!(slot(b"foo{}{bar}"), 8363);
    }

    #[test]
    fn a_hash_tag_is_the_first_non_empty_braces() {
        assert_eq!(hashed_part(b"ringway:history:{news}"), b"news");
        assert_eq!(hashed_part(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hashed_part(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(
            hashed_part(b"foo{}{bar}"),
            b"foo{}{bar}",
            "empty: the whole key"
        );
        assert_eq!(
            hashed_part(b"foo{bar"),
            b"foo{bar",
            "unclosed: the whole key"
        );
        assert_eq!(
            slot(b"ringway:epoch:{news}"),
            slot(b"ringway:history:{news}")
        );
    }

    fn bulk(s: &str) -> BytesFrame {
        BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn node(id: &str, port: i64, role: &str, health: &str) -> BytesFrame {
        BytesFrame::Array(vec![
            bulk("id"),
            bulk(id),
            bulk("port"),
            BytesFrame::Integer(port),
            bulk("tls-port"),
            BytesFrame::Integer(port + 1000),
            bulk("ip"),
            bulk("127.0.0.1"),
            bulk("endpoint"),
            bulk("127.0.0.1"),
            bulk("role"),
            bulk(role),
            bulk("replication-offset"),
            BytesFrame::Integer(72156),
            bulk("health"),
            bulk(health),
        ])
    }

    fn shard(ranges: &[i64], nodes: Vec<BytesFrame>) -> BytesFrame {
        BytesFrame::Array(vec![
            bulk("slots"),
            BytesFrame::Array(ranges.iter().map(|&s| BytesFrame::Integer(s)).collect()),
            bulk("nodes"),
            BytesFrame::Array(nodes),
        ])
    }

    fn addr(port: u16) -> Addr {
        Addr {
            host: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn the_slot_map_follows_cluster_shards() {
        let reply = BytesFrame::Array(vec![
            shard(
                &[0, 5460],
                vec![
                    node("a", 7000, "master", "online"),
                    node("d", 7003, "replica", "online"),
                ],
            ),
            shard(
                &[5461, 10922],
                vec![
                    node("e", 7004, "replica", "online"),
                    node("b", 7001, "master", "online"),
                ],
            ),
            shard(
                &[10923, 16000, 16001, 16383],
                vec![node("c", 7002, "master", "online")],
            ),
            // A node that has just joined serves nothing yet: no link goes to it.
            shard(&[], vec![node("f", 7005, "master", "online")]),
        ]);
        let map = SlotMap::from_shards(&reply, false).unwrap();
        assert_eq!(map.masters.len(), 3);
        assert_eq!(map.master_of(0).unwrap().addr, addr(7000));
        assert_eq!(map.master_of(0).unwrap().replicas, vec![addr(7003)]);
        assert_eq!(map.master_of(5461).unwrap().id, "b");
        assert_eq!(map.master_of(16383).unwrap().addr, addr(7002));
        assert!(map.check_covered().is_ok());
        // Over TLS, each node is reached at its TLS port.
        let tls = SlotMap::from_shards(&reply, true).unwrap();
        assert_eq!(tls.master_of(0).unwrap().addr, addr(8000));
    }

    #[test]
    fn a_shard_without_an_online_master_leaves_its_slots_unserved() {
        let reply = BytesFrame::Array(vec![
            shard(&[0, 8191], vec![node("a", 7000, "master", "online")]),
            shard(
                &[8192, 16383],
                vec![
                    node("b", 7001, "master", "failed"),
                    node("e", 7004, "replica", "online"),
                ],
            ),
        ]);
        let map = SlotMap::from_shards(&reply, false).unwrap();
        assert_eq!(map.master_index(8192), None);
        assert_eq!(map.check_covered(), Err(ClusterError::Uncovered(8192)));
    }

    #[test]
    fn a_bad_reply_is_an_error_not_a_panic() {
        assert!(SlotMap::from_shards(&bulk("no"), false).is_err());
        let reply = BytesFrame::Array(vec![shard(
            &[0, 16384],
            vec![node("a", 7000, "master", "online")],
        )]);
        assert!(matches!(
            SlotMap::from_shards(&reply, false),
            Err(ClusterError::SlotRange { .. })
        ));
        let odd = BytesFrame::Array(vec![BytesFrame::Array(vec![bulk("slots")])]);
        assert!(SlotMap::from_shards(&odd, false).is_err());
    }

    #[test]
    fn moved_repoints_one_slot() {
        let reply = BytesFrame::Array(vec![shard(
            &[0, 16383],
            vec![node("a", 7000, "master", "online")],
        )]);
        let mut map = SlotMap::from_shards(&reply, false).unwrap();
        map.moved(42, &addr(7001));
        assert_eq!(map.master_of(42).unwrap().addr, addr(7001));
        assert_eq!(map.master_of(43).unwrap().addr, addr(7000));
    }

    #[test]
    fn redirections_are_read_from_error_replies() {
        assert_eq!(
            Redirect::parse("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved {
                slot: 3999,
                addr: Addr {
                    host: "127.0.0.1".into(),
                    port: 6381
                }
            })
        );
        assert_eq!(
            Redirect::parse("ASK 3999 [::1]:6381"),
            Some(Redirect::Ask {
                slot: 3999,
                addr: Addr {
                    host: "::1".into(),
                    port: 6381
                }
            })
        );
        for bad in [
            "MOVED",
            "MOVED x 1.2.3.4:1",
            "MOVED 16384 h:1",
            "ERR nope",
            "ASK 1 h:p",
        ] {
            assert_eq!(Redirect::parse(bad), None, "{bad}");
        }
    }
}
