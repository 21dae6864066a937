//! The rendezvous: where and how the ranks of an attempt meet (rank 0's TCPStore, its address
//! and socket, the attempt's store prefix), checked and prepared before the shim joins the group.
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use super::Backend;
use crate::{Error, Result};

/// The store prefix of [`Rendezvous::new`], shared by every rank of a test or benchmark on one
/// machine. A real job never uses it: its ranks get the attempt's secret from the coordinator
/// ([`Rendezvous::from_assignment`]).
pub const DEFAULT_STORE_PREFIX: &str = "bt-local";

/// The longest store prefix accepted, in bytes.
pub const MAX_STORE_PREFIX_LEN: usize = 128;

/// Checks a store prefix: non-empty, at most [`MAX_STORE_PREFIX_LEN`] bytes, ASCII letters,
/// digits, `-` and `_` only. The error names the field, never the value (it is a secret).
pub fn validate_store_prefix(prefix: &str) -> Result<()> {
    let bad = |why: String| Err(Error::Dist(format!("rendezvous: store_prefix {why}")));
    if prefix.is_empty() {
        return bad("is empty".into());
    }
    if prefix.len() > MAX_STORE_PREFIX_LEN {
        return bad(format!(
            "is {} bytes long, more than {MAX_STORE_PREFIX_LEN}",
            prefix.len()
        ));
    }
    if let Some(pos) = prefix
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return bad(format!(
            "has a byte other than ASCII letters, digits, '-' and '_' (at offset {pos})"
        ));
    }
    Ok(())
}

/// Where and how to meet the other ranks; handed out by the coordinator per attempt.
#[derive(Clone)]
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    /// Host of rank 0's TCPStore.
    pub master_addr: String,
    pub master_port: u16,
    /// Bounds the rendezvous and every collective: a missing or dead peer is an error after this.
    pub timeout: Duration,
    pub backend: Backend,
    /// Address this rank's Gloo transport binds to and advertises; None: the local address that
    /// routes to `master_addr` (the master address itself when that is loopback).
    pub local_addr: Option<String>,
    /// Build a real backend even for a world of one (a one-GPU NCCL check); otherwise a group of
    /// one rank skips the rendezvous and its collectives are no-ops.
    pub join_alone: bool,
    /// Every key the ranks write in rank 0's TCPStore lives under `bt/<store_prefix>/`; a peer
    /// with another prefix meets nobody and times out. For a real job this is the attempt's
    /// secret: never logged, and redacted from this module's errors (see [`validate_store_prefix`]
    /// for what is allowed). Not authentication: see the shim's `bt_pg_new`.
    pub store_prefix: String,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendezvous")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("master_addr", &self.master_addr)
            .field("master_port", &self.master_port)
            .field("timeout", &self.timeout)
            .field("backend", &self.backend)
            .field("local_addr", &self.local_addr)
            .field("join_alone", &self.join_alone)
            .field("store_prefix", &"<redacted>")
            .finish()
    }
}

impl Rendezvous {
    /// A Gloo rendezvous with the local address chosen automatically and the shared
    /// [`DEFAULT_STORE_PREFIX`] (set `store_prefix` for anything but a test or benchmark).
    pub fn new(
        rank: usize,
        world_size: usize,
        master_addr: impl Into<String>,
        master_port: u16,
        timeout: Duration,
    ) -> Self {
        Rendezvous {
            rank,
            world_size,
            master_addr: master_addr.into(),
            master_port,
            timeout,
            backend: Backend::Gloo,
            local_addr: None,
            join_alone: false,
            store_prefix: DEFAULT_STORE_PREFIX.to_string(),
        }
    }

    /// The rendezvous of one rank of an attempt, as the coordinator assigned it. A group of
    /// several ranks needs the attempt's store prefix: an assignment without one is refused
    /// rather than given a default that any stray peer would share.
    pub fn from_assignment(a: &bt_proto::Assignment, timeout: Duration) -> Result<Self> {
        let port = u16::try_from(a.master_port).map_err(|_| {
            Error::Dist(format!(
                "rendezvous: master port {} is not a TCP port",
                a.master_port
            ))
        })?;
        let mut rv = Rendezvous::new(
            a.rank as usize,
            a.world_size as usize,
            a.master_addr.clone(),
            port,
            timeout,
        );
        if a.store_prefix.is_empty() {
            if a.world_size > 1 {
                return Err(Error::Dist(format!(
                    "rendezvous: the assignment has no store_prefix; a group of {} ranks needs \
                     the attempt's secret from the coordinator (protocol 2 or later)",
                    a.world_size
                )));
            }
        } else {
            validate_store_prefix(&a.store_prefix)?;
            rv.store_prefix = a.store_prefix.clone();
        }
        Ok(rv)
    }

    /// Every address the master host resolves to (at least one).
    pub(super) fn master_socket_addrs(&self) -> Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .map_err(|e| {
                Error::Dist(format!(
                    "rendezvous: cannot resolve master address {:?}: {e}",
                    self.master_addr
                ))
            })?
            .collect();
        if addrs.is_empty() {
            return Err(Error::Dist(format!(
                "rendezvous: master address {:?} resolves to nothing",
                self.master_addr
            )));
        }
        Ok(addrs)
    }

    pub(super) fn resolve_local_addr(&self, masters: &[SocketAddr]) -> Result<String> {
        if let Some(a) = &self.local_addr {
            return Ok(a.clone());
        }
        let master = masters[0];
        if master.ip().is_loopback() {
            return Ok(master.ip().to_string());
        }
        // The address of the interface that routes to the master (connect on UDP sends nothing).
        let bind: IpAddr = if master.is_ipv4() {
            [0, 0, 0, 0].into()
        } else {
            [0u16; 8].into()
        };
        let sock = UdpSocket::bind((bind, 0))
            .and_then(|s| s.connect(master).map(|_| s))
            .and_then(|s| s.local_addr())
            .map_err(|e| {
                Error::Dist(format!(
                    "rendezvous: cannot find the local address that reaches {master} ({e}); \
                     set Rendezvous::local_addr"
                ))
            })?;
        Ok(sock.ip().to_string())
    }

    /// For rank 0: the store's listening socket, bound here. A master host that resolves to
    /// exactly one address (the node address the coordinator handed out for the attempt) gets a
    /// socket on that address only, so the unauthenticated store is not reachable through the
    /// node's other interfaces; the address must be local, or this is an error.
    ///
    /// A host name with several addresses (`localhost`: 127.0.0.1 and ::1) binds the wildcard of
    /// the addresses' family, never libtorch's own choice: libtorch would listen on IPv6 (dual stack), where an
    /// IPv4 peer shows up as `::ffff:a.b.c.d`; the store resolves every peer's name as it
    /// connects, and that name is in no hosts file, so on a machine without a reachable DNS
    /// server each lookup stalled the whole store for the resolver's 5 s timeout. An IPv4 socket
    /// sees plain IPv4 peers. A host name with any IPv6 address keeps the dual-stack socket,
    /// reachable over both families. A single IPv4 address is an IPv4 socket too.
    pub(super) fn bind_store(&self, masters: &[SocketAddr]) -> Result<TcpListener> {
        let addr = SocketAddr::new(store_bind_ip(masters), self.master_port);
        TcpListener::bind(addr).map_err(|e| {
            Error::Dist(format!(
                "rendezvous: rank 0 cannot host the store on {addr} (port {}, master address \
                 {:?}): {e}",
                self.master_port, self.master_addr
            ))
        })
    }

    /// For ranks other than 0: waits until rank 0's store accepts connections, polling every few
    /// milliseconds, for at most the timeout. libtorch's own client retries with a randomized
    /// back-off of seconds, which could stretch a missing rank 0 well past the timeout and slows
    /// down a rendezvous where this rank starts first.
    pub(super) fn wait_for_store(&self, masters: &[SocketAddr]) -> Result<()> {
        let start = Instant::now();
        loop {
            let left = self.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::Dist(format!(
                    "rendezvous: rank 0's store at {}:{} did not accept connections within {:?} \
                     (rank {} of {})",
                    self.master_addr, self.master_port, self.timeout, self.rank, self.world_size
                )));
            }
            let attempt = left.min(Duration::from_millis(500));
            if masters
                .iter()
                .any(|a| TcpStream::connect_timeout(a, attempt).is_ok())
            {
                return Ok(());
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }
}

/// The address rank 0's store listens on, given every address of the master host: the only one,
/// or the wildcard of their family when there are several (see `Rendezvous::bind_store`).
fn store_bind_ip(masters: &[SocketAddr]) -> IpAddr {
    let mut ips: Vec<IpAddr> = masters.iter().map(SocketAddr::ip).collect();
    ips.sort();
    ips.dedup();
    if let [only] = ips[..] {
        return only;
    }
    if ips.iter().all(IpAddr::is_ipv4) {
        [0, 0, 0, 0].into()
    } else {
        [0u16; 8].into()
    }
}
