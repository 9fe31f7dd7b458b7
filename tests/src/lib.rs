//! Shared helpers for the privileged tests and the demo: network-namespace labs,
//! traffic, and frame builders.

pub mod daemon;
pub mod drpacket;
pub mod ecmp;
pub mod failover;
pub mod lab;
pub mod natlab;
pub mod natpacket;
pub mod natpmtu;
pub mod netns;
pub mod pmtu;
pub mod routed;
pub mod segment;
pub mod traffic;
pub mod vrrp;
pub mod flood;
pub mod frames;
pub mod tls;
pub mod tunnel;
pub mod twoarm;
