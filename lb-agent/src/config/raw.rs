//! The file as `serde_yaml` reads it: every field optional and loosely typed, so that
//! missing fields, ranges and formats are checked (all at once) by `validate.rs`.
//! Unknown fields and values of the wrong YAML type are rejected here.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with a `services` list")]
pub(super) struct RawConfig {
    pub conntrack_size: Option<Int>,
    pub established_size: Option<Int>,
    pub timeouts: Option<RawTimeouts>,
    pub tunnel_source_v4: Option<String>,
    pub tunnel_source_v6: Option<String>,
    pub mtu: Option<Int>,
    pub answer_ping: Option<bool>,
    pub forward_icmp: Option<bool>,
    pub syn_flood_kps: Option<Int>,
    /// `forwarding: fullnat`: the SNAT pool every service without its own uses.
    pub snat_addresses: Option<Vec<String>>,
    pub snat_ports: Option<String>,
    pub fragments: Option<RawFragments>,
    pub services: Option<Vec<RawService>>,
}

/// `fragments:`, the table that sends a datagram's fragments where its first went.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of size and timeout")]
pub(super) struct RawFragments {
    pub size: Option<Int>,
    pub timeout: Option<String>,
}

/// `timeouts:`, the idle timeouts of established connection-table entries.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of tcp, tcp_fin and udp durations")]
pub(super) struct RawTimeouts {
    pub tcp: Option<String>,
    pub tcp_fin: Option<String>,
    pub udp: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a service mapping")]
pub(super) struct RawService {
    pub name: Option<String>,
    pub vip: Option<String>,
    pub port: Option<Int>,
    pub protocol: Option<String>,
    pub scheduler: Option<String>,
    /// `sh`: client address prefix lengths hashed (`config/validate/sched.rs`).
    pub prefix_v4: Option<Int>,
    pub prefix_v6: Option<Int>,
    pub forwarding: Option<String>,
    pub gue_port: Option<Int>,
    /// `forwarding: fullnat` only: this service's SNAT pool.
    pub snat_addresses: Option<Vec<String>>,
    pub snat_ports: Option<String>,
    pub table_size: Option<Int>,
    pub backends: Option<Vec<RawBackend>>,
    /// Boxed, as in `RawBackend`.
    pub probe: Option<Box<RawProbe>>,
    pub on_all_down: Option<String>,
    /// Boxed, as `probe`.
    pub persistence: Option<Box<RawPersistence>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a backend mapping")]
pub(super) struct RawBackend {
    pub address: Option<String>,
    pub weight: Option<Int>,
    pub backup: Option<bool>,
    /// `forwarding: nat` and `fullnat` only: the port the backend listens on.
    pub port: Option<Int>,
    /// Boxed: a file may hold hundreds of thousands of backends, most without a probe
    /// of their own, and a `RawProbe` is about 500 bytes.
    pub probe: Option<Box<RawProbe>>,
}

/// A `probe:` block, of a service or of a backend (whose fields override the service's).
/// Durations, the kind and the status range are strings, parsed by `validate.rs`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a probe mapping")]
pub(super) struct RawProbe {
    pub kind: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<Int>,
    pub fall: Option<Int>,
    pub initial: Option<String>,
    pub port: Option<Int>,
    pub address: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub sni: Option<String>,
    pub expect_status: Option<String>,
    pub body_contains: Option<String>,
    pub verify_tls: Option<bool>,
    pub ca_file: Option<String>,
    pub payload: Option<String>,
    pub expect: Option<String>,
    pub command: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a persistence mapping")]
pub(super) struct RawPersistence {
    pub timeout: Option<String>,
    pub prefix_v4: Option<Int>,
    pub prefix_v6: Option<Int>,
}

/// An integer of any size YAML can express, range-checked later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Int(pub i128);

impl Int {
    /// The value if it lies in `min..=max`.
    pub fn within<T>(self, min: T, max: T) -> Option<T>
    where
        T: TryFrom<i128> + Into<i128> + Copy,
    {
        if self.0 >= min.into() && self.0 <= max.into() {
            T::try_from(self.0).ok()
        } else {
            None
        }
    }
}

impl fmt::Display for Int {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntVisitor;

        impl Visitor<'_> for IntVisitor {
            type Value = Int;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }

            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Int, E> {
                Ok(Int(v))
            }

            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Int, E> {
                i128::try_from(v)
                    .map(Int)
                    .map_err(|_| E::custom(format!("integer {v} is too large")))
            }
        }

        deserializer.deserialize_i128(IntVisitor)
    }
}
