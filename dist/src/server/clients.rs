//! Per-client bounds: one address may hold only a share of the connections and of the
//! diff workers, so a single flooding client cannot starve the rest of the fleet.
//!
//! A client is an IPv4 address or an IPv6 /64 (one host or site gets a whole /64, so
//! counting exact IPv6 addresses would give it billions of shares). Hosts behind one NAT
//! share an address, which is why the connection share is generous by default; diffs they
//! share (same base, same target) count once, as only the request that starts a diff
//! holds a diff slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The address of the client that sent a request (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub IpAddr);

pub struct PerClient {
    limit: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One of a client's slots; given back on drop.
pub struct Slot {
    owner: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(PerClient {
            limit: limit.max(1),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `ip`'s client, or None if it already holds `limit`.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let ip = client_of(ip);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(ip).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: self.clone(),
            ip,
        })
    }
}

/// The key a client is counted under: IPv4 as is (also when mapped into IPv6), IPv6 by
/// its /64.
pub fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // Addresses come and go; the map holds only current clients.
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_share_given_back_on_drop() {
        let limits = PerClient::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = limits.try_acquire(a).unwrap();
        let _a2 = limits.try_acquire(a).unwrap();
        assert!(limits.try_acquire(a).is_none(), "a third slot for the same address");
        let _b1 = limits.try_acquire(b).expect("another address is not affected");
        drop(a1);
        assert_eq!(limits.held.lock().unwrap()[&a], 1);
        assert!(limits.try_acquire(a).is_some());
        drop(_a2);
        assert_eq!(limits.held.lock().unwrap().len(), 1, "only b is still tracked");
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let limits = PerClient::new(1);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same64: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let other64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _s = limits.try_acquire(a).unwrap();
        assert!(limits.try_acquire(same64).is_none(), "another address of the same /64");
        assert!(limits.try_acquire(other64).is_some(), "another /64");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_of(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
