//! Where the relay's Redis is: one server, or a Redis Cluster used through sharded pub/sub.
//!
//! `REDIS_URL=redis://host:port` names one server: channels are plain (`PUBLISH` /
//! `SUBSCRIBE`), and everything goes through it. `REDIS_URL=redis+cluster://host:port,host:port`
//! names seed nodes of a cluster (Redis 7+): each channel lives on the master that owns its hash
//! slot, and is used with `SPUBLISH` / `SSUBSCRIBE` there, so relay traffic spreads over the
//! shards instead of every message crossing every node (classic pub/sub in a cluster is
//! broadcast to all nodes). The map of slots to masters comes from `CLUSTER SLOTS` on any
//! reachable seed, and is read again after any error (a failover, a moved slot, a dead node).
//! A single server is treated as a one-shard topology, so the relay threads have one path.

use std::collections::BTreeMap;
use std::time::Duration;

/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The relay's Redis, as `REDIS_URL` gives it.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    Single {
        url: String,
    },
    /// Seed nodes, each as a `redis://` URL (credentials carried over).
    Cluster {
        seeds: Vec<String>,
    },
}

impl RedisTarget {
    /// Reads `REDIS_URL`: `redis://…` for one server, `redis+cluster://[user:pass@]h:p,h:p…`
    /// for a cluster.
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let rest = rest.trim_end_matches('/');
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), rest),
            };
            let seeds: Vec<String> = hosts
                .split(',')
                .map(str::trim)
                .filter(|host| !host.is_empty())
                .map(|host| format!("redis://{auth}{host}/"))
                .collect();
            if seeds.is_empty() {
                return Err("redis+cluster:// needs at least one host:port".into());
            }
            for seed in &seeds {
                redis::Client::open(seed.as_str()).map_err(|e| format!("{seed}: {e}"))?;
            }
            return Ok(RedisTarget::Cluster { seeds });
        }
        redis::Client::open(url).map_err(|e| e.to_string())?;
        Ok(RedisTarget::Single {
            url: url.to_string(),
        })
    }

    /// Whether channels are sharded (`SPUBLISH` / `SSUBSCRIBE`).
    pub fn sharded(&self) -> bool {
        matches!(self, RedisTarget::Cluster { .. })
    }

    /// The shards now: the one server, or the cluster's masters from the first seed that
    /// answers `CLUSTER SLOTS`.
    pub fn topology(&self, timeout: Duration) -> redis::RedisResult<Topology> {
        let seeds = match self {
            RedisTarget::Single { url } => {
                return Ok(Topology {
                    shards: vec![Shard {
                        url: url.clone(),
                        ranges: vec![(0, SLOTS - 1)],
                    }],
                })
            }
            RedisTarget::Cluster { seeds } => seeds,
        };
        let mut last_error = None;
        for seed in seeds {
            match read_slots(seed, timeout) {
                Ok(topology) => return Ok(topology),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("no seed nodes").into()))
    }
}

/// One master and the slot ranges it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub url: String,
    ranges: Vec<(u16, u16)>,
}

impl Shard {
    fn owns(&self, slot: u16) -> bool {
        self.ranges
            .iter()
            .any(|&(first, last)| (first..=last).contains(&slot))
    }
}

/// Which master serves which channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub shards: Vec<Shard>,
}

impl Topology {
    /// The shard a channel lives on (a single server's topology has one).
    pub fn shard_of(&self, channel: &str) -> usize {
        if self.shards.len() == 1 {
            return 0;
        }
        let slot = slot(channel);
        self.shards
            .iter()
            .position(|shard| shard.owns(slot))
            .unwrap_or(0)
    }

    /// A channel named from `prefix` that lives on shard `index` (its per-shard heartbeat): the
    /// first of `prefix{0}`, `prefix{1}`, … whose hash slot that shard owns. Every instance
    /// computes the same name from the same topology.
    pub fn channel_on(&self, index: usize, prefix: &str) -> String {
        let Some(shard) = self.shards.get(index) else {
            return format!("{prefix}{{0}}");
        };
        (0u32..65536)
            .map(|n| format!("{prefix}{{{n}}}"))
            .find(|channel| self.shards.len() == 1 || shard.owns(slot(channel)))
            .unwrap_or_else(|| format!("{prefix}{{0}}"))
    }
}

/// Reads the slot map from one node.
fn read_slots(seed: &str, timeout: Duration) -> redis::RedisResult<Topology> {
    let client = redis::Client::open(seed)?;
    let mut connection = client.get_connection_with_timeout(timeout)?;
    connection.set_read_timeout(Some(timeout))?;
    let entries: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut connection)?;
    let seed_host = seed_host(seed);
    let auth = seed_auth(seed);
    let mut masters: BTreeMap<String, Vec<(u16, u16)>> = BTreeMap::new();
    for entry in entries {
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        let (Some(first), Some(last), Some(redis::Value::Array(master))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        let (Some(first), Some(last)) = (as_slot(first), as_slot(last)) else {
            continue;
        };
        let host = match master.first() {
            Some(redis::Value::BulkString(host)) if !host.is_empty() => {
                String::from_utf8_lossy(host).into_owned()
            }
            _ => seed_host.clone(),
        };
        let Some(redis::Value::Int(port)) = master.get(1) else {
            continue;
        };
        let url = format!("redis://{auth}{host}:{port}/");
        masters.entry(url).or_default().push((first, last));
    }
    if masters.is_empty() {
        return Err(std::io::Error::other("CLUSTER SLOTS listed no masters").into());
    }
    Ok(Topology {
        shards: masters
            .into_iter()
            .map(|(url, ranges)| Shard { url, ranges })
            .collect(),
    })
}

fn as_slot(value: &redis::Value) -> Option<u16> {
    match value {
        redis::Value::Int(n) => u16::try_from(*n).ok().filter(|&slot| slot < SLOTS),
        _ => None,
    }
}

/// `host` of `redis://[auth@]host:port/`.
fn seed_host(seed: &str) -> String {
    let rest = seed.trim_start_matches("redis://");
    let rest = rest.rsplit_once('@').map_or(rest, |(_, hosts)| hosts);
    let host_port = rest.trim_end_matches('/');
    host_port
        .rsplit_once(':')
        .map_or(host_port, |(host, _)| host)
        .to_string()
}

/// `auth@` of `redis://auth@host:port/`, or nothing.
fn seed_auth(seed: &str) -> String {
    let rest = seed.trim_start_matches("redis://");
    rest.rsplit_once('@')
        .map_or(String::new(), |(auth, _)| format!("{auth}@"))
}

/// The hash slot of a key or channel: CRC16 (XMODEM) of the key, or of the part between the
/// first `{` and the next `}` when that is not empty (a hash tag), modulo 16384.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16(hashed) % SLOTS
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
    }

    #[test]
    fn cluster_urls_name_their_seeds() {
        let target =
            RedisTarget::parse("redis+cluster://127.0.0.1:7001,127.0.0.1:7002/").expect("valid");
        let RedisTarget::Cluster { seeds } = target else {
            panic!("a cluster");
        };
        assert_eq!(
            seeds,
            ["redis://127.0.0.1:7001/", "redis://127.0.0.1:7002/"]
        );
        let target = RedisTarget::parse("redis+cluster://:secret@h:1").expect("valid");
        assert!(
            matches!(target, RedisTarget::Cluster { ref seeds } if seeds == &["redis://:secret@h:1/"])
        );
        assert!(RedisTarget::parse("redis+cluster://").is_err());
        assert!(!RedisTarget::parse("redis://127.0.0.1:6379")
            .expect("valid")
            .sharded());
        assert_eq!(seed_host("redis://:pw@10.0.0.1:7001/"), "10.0.0.1");
        assert_eq!(seed_auth("redis://:pw@10.0.0.1:7001/"), ":pw@");
    }

    #[test]
    fn every_shard_gets_its_own_heartbeat_channel() {
        let topology = Topology {
            shards: vec![
                Shard {
                    url: "a".into(),
                    ranges: vec![(0, 5460)],
                },
                Shard {
                    url: "b".into(),
                    ranges: vec![(5461, 10922)],
                },
                Shard {
                    url: "c".into(),
                    ranges: vec![(10923, 16383)],
                },
            ],
        };
        for index in 0..3 {
            let channel = topology.channel_on(index, "noomnim:db:hb");
            assert_eq!(topology.shard_of(&channel), index, "{channel}");
        }
    }
}
