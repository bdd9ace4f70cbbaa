//! Where a redirected connection was going. NAT's redirect rewrites the destination to the
//! relay's own port; the kernel keeps the original one, and `SO_ORIGINAL_DST` (IPv4) or
//! `IP6T_SO_ORIGINAL_DST` (IPv6) on the accepted socket returns it. That is the target
//! virt-handler's address and port, which the target relay then delivers to.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// The socket option number, the same for both families (`linux/netfilter_ipv4.h` and
/// `linux/netfilter_ipv6/ip6_tables.h`).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination an accepted, redirected connection was addressed to (`local` is the
/// socket's own address, which selects the family). A connection that was not translated has
/// no original destination: the kernel answers `NotFound`.
pub fn original_destination(
    stream: &impl AsRawFd,
    local: SocketAddr,
) -> std::io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    if local.is_ipv4() {
        // SAFETY: sockaddr_in is plain data; the kernel writes at most `len` bytes into it.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: a getsockopt on an open socket into a buffer of the stated length.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                &mut addr as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(addr.sin_port),
        )))
    } else {
        // SAFETY: as above, for sockaddr_in6.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: as above.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                &mut addr as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(addr.sin6_port),
            addr.sin6_flowinfo,
            addr.sin6_scope_id,
        )))
    }
}
