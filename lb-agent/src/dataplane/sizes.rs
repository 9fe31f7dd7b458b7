//! What the maps are sized for, and opening the data plane on a thread of its
//! own while the agent resolves the backends and builds the tables.

use lb_common::map_names as names;

use super::{Dataplane, DataplaneError, Opened, PinDir, Result};
use crate::{config::Forwarding, pinning::NAT_UNSIZED, plan::Plan};

/// What the maps are sized for: known from the configuration alone, so the
/// maps can be created and the programs verified while the plan is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub services: u32,
    /// Backends summed over services (a backend of two services counts twice).
    pub backends: u32,
    /// The services' `table_size`s summed.
    pub tables: u64,
    pub conntrack: u32,
    pub established: u32,
    pub frags: u32,
    /// Prefix services, and `nat` or `fullnat` services: their programs are
    /// verified with the others when the maps are created (`load_sized`).
    pub prefix: bool,
    pub nat: bool,
}

impl Sizes {
    pub fn of(plan: &Plan) -> Sizes {
        Sizes {
            services: plan.services.len() as u32,
            backends: plan.backends.len() as u32,
            tables: plan.services.iter().map(|s| s.table_size as u64).sum(),
            conntrack: plan.conntrack_size,
            established: plan.established_size,
            frags: plan.frags_size,
            prefix: plan.has_prefix(),
            nat: plan.nat || plan.fullnat,
        }
    }

    /// The sizes `Plan::next` gives `config`'s plan.
    pub fn of_config(config: &crate::config::Config) -> Sizes {
        Sizes {
            services: config.services.len() as u32,
            backends: config.services.iter().map(|s| s.backends.len() as u32).sum(),
            tables: config.services.iter().map(|s| s.table_size as u64).sum(),
            conntrack: config.conntrack_size,
            established: config.established_size,
            frags: config.fragments.size,
            prefix: config.services.iter().any(|s| s.vip_prefix.is_some()),
            nat: config.services.iter().any(|s| matches!(s.forwarding, Forwarding::Nat | Forwarding::Fullnat)),
        }
    }
}

/// `MAGLEV` elements (two words each, `lb_common::table`) for the tables of
/// `sizes`: two halves per service (the double buffer), each its slots at two
/// bytes and its list of backend ids (at most the service's backends). With
/// `headroom`, room for the configuration to grow: a quarter more and one
/// more service of 65,537 slots and 1,024 backends.
pub fn maglev_elements(sizes: &Sizes, headroom: bool) -> u32 {
    let half_words = |slots: u64, ids: u64| slots.div_ceil(2) + ids;
    // Every service's table rounded up by a word is within this.
    let mut words = 2 * (half_words(sizes.tables, sizes.backends as u64) + sizes.services as u64);
    if headroom {
        words += words / 4 + 2 * half_words(65_537, 1024);
    }
    words.div_ceil(2).min(u32::MAX as u64) as u32
}

/// Map sizes for a plan, with room for the configuration to grow: twice the
/// services and backends, and for `MAGLEV` `maglev_elements` with headroom.
pub fn map_sizes(plan: &Plan) -> [(&'static str, u32); 20] {
    sized(&Sizes::of(plan))
}

pub(super) fn sized(sizes: &Sizes) -> [(&'static str, u32); 20] {
    let services = (sizes.services * 2).max(16);
    let backends = (sizes.backends * 2).max(64);
    // Every service's configured size, even while its table is empty (all down):
    // it needs its region the moment a backend comes up.
    let maglev = maglev_elements(sizes, true);
    let (conntrack, established) = (sizes.conntrack, sizes.established);
    // The NAT tables: both connection tables' size with `nat` or `fullnat`
    // services, one entry otherwise (a reload that adds the first one is refused
    // until a restart: `apply::check_fits`). Preallocated, they are most of the
    // maps' creation time and 250 MB at the default `conntrack_size`.
    let nat = if sizes.nat { conntrack.saturating_add(established).max(1) } else { NAT_UNSIZED };
    [
        (names::VIP_ADDRS, services),
        (names::SERVICES, services),
        (names::PREFIX_SERVICES, services),
        (names::SERVICE_STATS, services),
        (names::ROTATION, services),
        (names::BACKENDS, backends),
        (names::BACKEND_STATS, backends),
        (names::BACKEND_CONNS, backends),
        (names::BACKEND_CONN_DELTA, backends),
        (names::MAGLEV, maglev),
        (names::CONNTRACK, conntrack.max(1)),
        (names::CT_ESTABLISHED, established.max(1)),
        (names::FIRST_RECORD, lb_common::first_record_entries(conntrack)),
        (names::CT_SYN_FILTER, lb_common::syn_filter::entries(established)),
        (names::AFFINITY, (conntrack / 4).max(1024)),
        (names::FRAGS, sizes.frags.max(1)),
        (names::NAT_REVERSE, nat),
        (names::FULLNAT_REVERSE, nat),
        (names::FULLNAT_FORWARD, nat),
        (names::SNAT_POOLS, services),
    ]
}


/// `Dataplane::open` on a thread of its own, started once the configuration is
/// read (a fresh start: see `run`). Dropped before `finish`, as when the start
/// fails while resolving the backends, it waits for the thread and removes the
/// pins the thread created.
pub struct Opening(Option<std::thread::JoinHandle<Result<(Dataplane, Opened)>>>, Option<(Sizes, PinDir)>);

impl Opening {
    pub fn start(sizes: Sizes, pins: PinDir) -> Opening {
        let (s, p) = (sizes, pins.clone());
        match std::thread::Builder::new().name("lb-load".into()).spawn(move || Dataplane::open(&s, &p)) {
            Ok(thread) => Opening(Some(thread), None),
            // No thread: `finish` opens it then.
            Err(_) => Opening(None, Some((sizes, pins))),
        }
    }

    pub fn finish(mut self) -> Result<(Dataplane, Opened)> {
        if let Some((sizes, pins)) = self.1.take() {
            return Dataplane::open(&sizes, &pins);
        }
        let thread = self.0.take().expect("an Opening has its thread until finished");
        thread.join().unwrap_or_else(|_| {
            Err(DataplaneError::PinDir { path: "(the thread loading the programs)".into(), source: std::io::Error::other("it panicked") })
        })
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take()
            && let Ok(Ok((mut dp, opened))) = thread.join()
            && !opened.adopted
        {
            dp.unpin();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The maps a fresh start creates from the configuration (before the plan
    /// exists) are the ones the plan would have sized.
    #[test]
    fn the_configuration_gives_the_plans_sizes() {
        let text = "conntrack_size: 5000\nestablished_size: 3000\nfragments: { size: 700 }\nservices:
  - { name: a, vip: 198.18.1.1, port: 80, backends: [{address: 198.18.0.11}, {address: 198.18.0.12}] }
  - { name: b, vip: \"2001:db8::1\", port: 53, protocol: udp, table_size: 4099, backends: [{address: \"2001:db8::11\"}] }
  - { name: c, vip: 198.18.1.2, port: 80, backends: [{address: 198.18.0.11}, {address: 198.18.0.13}, {address: 198.18.0.14}] }
";
        let more = "snat_addresses: [198.18.0.2]\nservices:
  - { name: a, vip: 198.18.1.0/24, port: 80, backends: [{address: 198.18.0.11}] }
  - { name: b, vip: 198.18.2.1, port: 80, forwarding: fullnat, backends: [{address: 198.18.0.12}] }
";
        for text in [text, more] {
            let config = crate::config::parse(text, "t").expect("valid");
            let plan = Plan::build(&config, &Default::default());
            assert_eq!(Sizes::of_config(&config), Sizes::of(&plan), "{text}");
        }
        let config = crate::config::parse(text, "t").expect("valid");
        let plan = Plan::build(&config, &Default::default());
        assert_eq!(Sizes::of_config(&config), Sizes::of(&plan));
        assert_eq!(Sizes::of(&plan).backends, 6);
    }

    /// The NAT tables are sized with `nat` or `fullnat` services only.
    #[test]
    fn the_nat_tables_are_sized_with_nat_services_only() {
        let nat_sizes = |sizes: &Sizes| -> Vec<u32> {
            let all = sized(sizes);
            [names::NAT_REVERSE, names::FULLNAT_REVERSE, names::FULLNAT_FORWARD]
                .iter()
                .map(|n| all.iter().find(|(m, _)| m == n).expect("sized").1)
                .collect()
        };
        let dr = Sizes { services: 1, backends: 1, tables: 251, conntrack: 5000, established: 3000, frags: 8, prefix: false, nat: false };
        assert_eq!(nat_sizes(&dr), [NAT_UNSIZED; 3]);
        assert_eq!(nat_sizes(&Sizes { nat: true, ..dr }), [8000; 3]);
    }
}
