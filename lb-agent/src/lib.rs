//! The control-plane agent: configuration, Maglev tables, neighbour resolution and
//! the BPF maps that the XDP program reads.

pub mod announce;
pub mod apply;
pub mod batch;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod control;
pub mod dataplane;
pub mod decap;
pub mod first_record;
pub mod flows;
pub mod health;
pub mod maglev;
pub mod maglev_map;
pub mod metrics;
pub mod mmap;
pub mod nat_table;
pub mod fullnat_table;
pub mod neigh;
pub mod nexthop;
pub mod object;
pub mod observe;
pub mod ownership;
pub mod pinning;
pub mod plan;
pub mod reload;
pub mod report;
pub mod resolve;
pub mod run;
pub mod sched_tables;
pub mod status;
pub mod syn_filter;
pub mod trace;
