//! Floods of short flows for the connection-table tests: frames written straight
//! to an interface through an AF_PACKET socket (no handshake, no sockets on the
//! sending side), from random sources in 198.19.0.0/16 or 2001:db8:f::/48.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::frames::{ip_frame, tcp, udp};
use lb_common::{PROTO_TCP, PROTO_UDP};

/// TCP flags byte (offset 13 of the header).
const SYN: u8 = 0x02;

/// An AF_PACKET socket bound to one interface of the calling thread's namespace.
pub struct Injector {
    fd: i32,
    ifindex: i32,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
}

impl Injector {
    /// Opens a socket on `iface` sending frames from its own MAC to `dst_mac`.
    pub fn open(iface: &str, dst_mac: [u8; 6]) -> Injector {
        let name = std::ffi::CString::new(iface).expect("interface name");
        // SAFETY: plain socket(2) and if_nametoindex(3) calls; results are checked.
        let (fd, ifindex) = unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            (fd, libc::if_nametoindex(name.as_ptr()) as i32)
        };
        assert!(fd >= 0 && ifindex > 0, "AF_PACKET socket on {iface}: {}", std::io::Error::last_os_error());
        let mac = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).expect("interface MAC");
        let src_mac = parse_mac(mac.trim());
        Injector { fd, ifindex, src_mac, dst_mac }
    }

    /// Sends one frame (its MACs are replaced by the socket's); true if the kernel
    /// took it.
    pub fn send(&self, frame: &mut [u8]) -> bool {
        frame[0..6].copy_from_slice(&self.dst_mac);
        frame[6..12].copy_from_slice(&self.src_mac);
        // SAFETY: sockaddr_ll is plain data; sendto reads `frame` only.
        unsafe {
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = self.ifindex;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&self.dst_mac);
            let n = libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            n == frame.len() as isize
        }
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        // SAFETY: our own descriptor.
        unsafe { libc::close(self.fd) };
    }
}

pub fn parse_mac(text: &str) -> [u8; 6] {
    let v: Vec<u8> = text.split(':').map(|h| u8::from_str_radix(h, 16).expect("MAC hex")).collect();
    v.try_into().expect("six MAC bytes")
}

/// The source of flood flow `i`: unique per flow for up to 2^32 flows.
fn source(i: u32, v6: bool) -> (IpAddr, u16) {
    let x = i.wrapping_mul(0x9e37_79b9);
    let port = 1024 + (x % 60000) as u16;
    if v6 {
        (IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, (i >> 16) as u16, i as u16)), port)
    } else {
        (IpAddr::V4(Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8)), port.wrapping_add((i >> 16) as u16 * 7))
    }
}

/// `flows` two-packet flows to `vip:port`: TCP SYN then ACK, or two UDP
/// datagrams. Returns the frames the kernel accepted.
pub fn two_packet_flows(inj: &Injector, proto: u8, vip: IpAddr, port: u16, flows: u32) -> u64 {
    let mut sent = 0;
    for i in 0..flows {
        let (src, sport) = source(i, vip.is_ipv6());
        let (first, second) = match proto {
            PROTO_TCP => {
                let mut syn = tcp(sport, port, &[]);
                syn[13] = SYN;
                (syn, tcp(sport, port, &[]))
            }
            PROTO_UDP => (udp(sport, port, b"one"), udp(sport, port, b"two")),
            p => panic!("two_packet_flows: protocol {p}"),
        };
        for l4 in [first, second] {
            let mut f = ip_frame(None, src, vip, proto, &l4);
            sent += u64::from(inj.send(&mut f));
        }
    }
    sent
}
