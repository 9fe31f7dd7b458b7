//! The control-plane agent: configuration, Maglev tables, neighbour resolution and
//! the BPF maps that the XDP program reads.

pub mod cli;
pub mod config;
pub mod dataplane;
pub mod maglev;
pub mod neigh;
pub mod object;
pub mod plan;
pub mod report;
pub mod run;
