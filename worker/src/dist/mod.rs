//! Collectives over PyTorch's c10d (Gloo on CPU, NCCL on CUDA), driven through a small C++ shim
//! (`worker/csrc/bt_dist.cpp`, compiled by `worker/build.rs`).
//!
//! Every rank must issue the same collectives in the same order. A peer that dies or stops
//! participating makes the others fail with [`Error::Dist`] within the rendezvous timeout.
pub mod bench;
mod ffi;

pub(crate) use ffi::take_error_with as ffi_take_error;

use std::ffi::CString;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Size of the flat buffers [`ProcessGroup::broadcast_params`] packs parameters into (one
/// broadcast each, once per attempt; gradient buckets are `trainer::GRAD_BUCKET_BYTES`).
pub const BROADCAST_BUCKET_BYTES: usize = 64 << 20;

/// Which c10d backend runs the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Gloo over TCP; CPU tensors.
    #[default]
    Gloo,
    /// NCCL on the given CUDA device; CUDA tensors. Needs the `nccl` cargo feature.
    Nccl { device_index: usize },
}

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
    fn master_socket_addrs(&self) -> Result<Vec<SocketAddr>> {
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

    fn resolve_local_addr(&self, masters: &[SocketAddr]) -> Result<String> {
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
    fn bind_store(&self, masters: &[SocketAddr]) -> Result<TcpListener> {
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
    fn wait_for_store(&self, masters: &[SocketAddr]) -> Result<()> {
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

/// A process group over all ranks of one attempt. A group of one rank needs no rendezvous and
/// turns every collective into a local no-op.
pub struct ProcessGroup {
    rank: usize,
    world_size: usize,
    backend: Backend,
    raw: *mut ffi::BtPg,
    /// The store prefix, to redact it from the shim's messages.
    secret: String,
}

// SAFETY: the shim's group is reference counted and serializes its collectives with a mutex; the
// handle is only freed in Drop.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: raw came from bt_pg_new and is freed once.
            unsafe { ffi::bt_pg_free(self.raw) };
            self.raw = std::ptr::null_mut();
        }
    }
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("backend", &self.backend)
            .finish()
    }
}

fn to_c_int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Dist(format!("{what} {v} is too large")))
}

impl ProcessGroup {
    /// Joins the group (rank 0 hosts the TCPStore). Blocks until all ranks arrive or the timeout.
    pub fn new(rv: &Rendezvous) -> Result<Self> {
        if rv.world_size == 0 || rv.rank >= rv.world_size {
            return Err(Error::Dist(format!(
                "rendezvous: rank {} is outside a world of {}",
                rv.rank, rv.world_size
            )));
        }
        if rv.world_size == 1 && !rv.join_alone {
            return Ok(ProcessGroup {
                rank: 0,
                world_size: 1,
                backend: rv.backend,
                raw: std::ptr::null_mut(),
                secret: String::new(),
            });
        }
        validate_store_prefix(&rv.store_prefix)?;
        let prefix = CString::new(rv.store_prefix.as_str())
            .map_err(|_| Error::Dist("rendezvous: store_prefix contains NUL".into()))?;
        let masters = rv.master_socket_addrs()?;
        let local = rv.resolve_local_addr(&masters)?;
        // rank 0 keeps its copy of the socket open until the store has taken over its own
        let listener = if rv.rank == 0 {
            Some(rv.bind_store(&masters)?)
        } else {
            rv.wait_for_store(&masters)?;
            None
        };
        // the store's copy; closed here unless it reaches the shim
        let store_fd: Option<OwnedFd> = listener
            .as_ref()
            .map(|l| l.try_clone().map(OwnedFd::from))
            .transpose()
            .map_err(|e| Error::Dist(format!("rendezvous: store socket: {e}")))?;
        let master = CString::new(rv.master_addr.as_str())
            .map_err(|_| Error::Dist("rendezvous: master address contains NUL".into()))?;
        let local = CString::new(local)
            .map_err(|_| Error::Dist("rendezvous: local address contains NUL".into()))?;
        let (code, device) = match rv.backend {
            Backend::Gloo => (0, 0),
            Backend::Nccl { device_index } => (1, to_c_int(device_index, "device index")?),
        };
        let timeout_ms = i64::try_from(rv.timeout.as_millis().max(1)).unwrap_or(i64::MAX);
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C strings and out pointer for the duration of the call.
        let err = unsafe {
            ffi::bt_pg_new(
                code,
                master.as_ptr(),
                rv.master_port,
                local.as_ptr(),
                to_c_int(rv.rank, "rank")?,
                to_c_int(rv.world_size, "world size")?,
                timeout_ms,
                device,
                store_fd.map_or(-1, IntoRawFd::into_raw_fd),
                prefix.as_ptr(),
                &mut raw,
            )
        };
        drop(listener);
        ffi::take_error_redacted(
            err,
            &format!(
                "joining process group (rank {} of {}, store {}:{})",
                rv.rank, rv.world_size, rv.master_addr, rv.master_port
            ),
            &rv.store_prefix,
        )?;
        Ok(ProcessGroup {
            rank: rv.rank,
            world_size: rv.world_size,
            backend: rv.backend,
            raw,
            secret: rv.store_prefix.clone(),
        })
    }

    /// The shim's result for this group, its message free of the store prefix.
    fn check(&self, err: *mut std::ffi::c_char, what: &str) -> Result<()> {
        ffi::take_error_redacted(err, what, &self.secret)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// The device this group's collectives take tensors on.
    pub fn device(&self) -> Device {
        match self.backend {
            Backend::Gloo => Device::Cpu,
            Backend::Nccl { device_index } => Device::Cuda(device_index),
        }
    }

    fn single(&self) -> bool {
        self.raw.is_null()
    }

    /// In-place sum over ranks.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        if self.single() {
            return Ok(());
        }
        // SAFETY: live group handle and tensor handle.
        let err = unsafe { ffi::bt_pg_all_reduce_sum(self.raw, ffi::ptr(t)) };
        self.check(err, "all_reduce")
    }

    /// Gathers `t` from every rank, concatenated along dim 0 in rank order. Every rank must pass
    /// the same shape. The result is detached (see [`Self::all_gather_with_grad`]).
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if self.single() {
            return Ok(t.detach().copy());
        }
        let mut out = std::ptr::null_mut();
        // SAFETY: live handles; on success `out` is a new at::Tensor we own.
        let err = unsafe { ffi::bt_pg_all_gather(self.raw, ffi::ptr(t), &mut out) };
        self.check(err, "all_gather")?;
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// Gathers `t` from every rank into `out` (shape `[world·n, ...]`, contiguous, same kind),
    /// reusing the caller's buffer instead of allocating one per call.
    pub fn all_gather_into(&self, t: &Tensor, out: &Tensor) -> Result<()> {
        if self.single() {
            out.shallow_clone().f_copy_(t)?;
            return Ok(());
        }
        // SAFETY: live handles; the shim checks `out`'s shape and writes into it.
        let err = unsafe { ffi::bt_pg_all_gather_into(self.raw, ffi::ptr(t), ffi::ptr(out)) };
        self.check(err, "all_gather")
    }

    /// All-gather along dim 0 whose local slice keeps `t`'s autograd graph: backward through the
    /// result gives this rank exactly its share of the gradient (sum over ranks = the gradient
    /// of a single process holding the whole batch).
    pub fn all_gather_with_grad(&self, t: &Tensor) -> Result<Tensor> {
        if self.single() {
            return Ok(t.shallow_clone());
        }
        let gathered = self.all_gather(t)?;
        let n = t.size().first().copied().unwrap_or(0);
        let r = self.rank as i64;
        let w = self.world_size as i64;
        let mut parts = Vec::with_capacity(3);
        if r > 0 {
            parts.push(gathered.f_narrow(0, 0, r * n)?);
        }
        parts.push(t.shallow_clone());
        if r + 1 < w {
            parts.push(gathered.f_narrow(0, (r + 1) * n, (w - r - 1) * n)?);
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// In-place broadcast from `root`.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(Error::Dist(format!(
                "broadcast: root {root} is not a rank of a group of {}",
                self.world_size
            )));
        }
        if self.single() {
            return Ok(());
        }
        // SAFETY: live handles.
        let err = unsafe { ffi::bt_pg_broadcast(self.raw, ffi::ptr(t), to_c_int(root, "root")?) };
        self.check(err, "broadcast")
    }

    pub fn barrier(&self) -> Result<()> {
        if self.single() {
            return Ok(());
        }
        // SAFETY: live handle.
        let err = unsafe { ffi::bt_pg_barrier(self.raw) };
        self.check(err, "barrier")
    }

    /// Sums the gradients of `params` over ranks (no averaging), packed into flat buckets of about
    /// `bucket_bytes` (one all-reduce per bucket). A parameter without a gradient gets a zero one,
    /// so every rank packs the same layout.
    pub fn allreduce_grads(&self, params: &[Tensor], bucket_bytes: usize) -> Result<()> {
        if self.single() {
            return Ok(());
        }
        let ptrs: Vec<_> = params.iter().map(ffi::ptr).collect();
        let bucket = i64::try_from(bucket_bytes.max(1)).unwrap_or(i64::MAX);
        // SAFETY: live handles; the array outlives the call.
        let err = unsafe {
            ffi::bt_pg_allreduce_grads(self.raw, ptrs.as_ptr(), ptrs.len() as i64, bucket)
        };
        self.check(err, "gradient all_reduce")
    }

    /// Persistent gradient buckets over `params` (see [`GradBuckets`]); build them once, after the
    /// parameters reached their final device and memory format.
    pub fn grad_buckets(&self, params: &[Tensor], bucket_bytes: usize) -> Result<GradBuckets> {
        if self.single() {
            return Ok(GradBuckets {
                raw: std::ptr::null_mut(),
                count: 0,
                secret: String::new(),
            });
        }
        let ptrs: Vec<_> = params.iter().map(ffi::ptr).collect();
        let bucket = i64::try_from(bucket_bytes.max(1)).unwrap_or(i64::MAX);
        let mut raw = std::ptr::null_mut();
        // SAFETY: live handles; the array outlives the call; `raw` is ours on success.
        let err = unsafe {
            ffi::bt_grad_buckets_new(self.raw, ptrs.as_ptr(), ptrs.len() as i64, bucket, &mut raw)
        };
        self.check(err, "gradient buckets")?;
        // SAFETY: raw is a live bucket set.
        let count = unsafe { ffi::bt_grad_buckets_count(raw) } as usize;
        Ok(GradBuckets {
            raw,
            count,
            secret: self.secret.clone(),
        })
    }

    /// Overwrites `tensors` (parameters, buffers) with `root`'s values, in flat buckets.
    pub fn broadcast_params(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(Error::Dist(format!(
                "broadcast_params: root {root} is not a rank of a group of {}",
                self.world_size
            )));
        }
        if self.single() {
            return Ok(());
        }
        let ptrs: Vec<_> = tensors.iter().map(ffi::ptr).collect();
        // SAFETY: live handles; the array outlives the call.
        let err = unsafe {
            ffi::bt_pg_broadcast_tensors(
                self.raw,
                ptrs.as_ptr(),
                ptrs.len() as i64,
                to_c_int(root, "root")?,
                BROADCAST_BUCKET_BYTES as i64,
            )
        };
        self.check(err, "parameter broadcast")
    }

    /// Verifies that every rank holds the same `value` (e.g. a config hash or the model's shape
    /// list). A mismatch is an error on every rank naming the ranks and their values.
    pub fn check_agreement(&self, what: &str, value: &[u8]) -> Result<()> {
        if self.single() {
            return Ok(());
        }
        let mut digest = Sha256::digest(value).to_vec();
        digest.extend_from_slice(&(value.len() as u64).to_le_bytes());
        let gathered = self.gather_bytes(&digest)?;
        let width = digest.len();
        if gathered.chunks(width).all(|c| c == digest.as_slice()) {
            return Ok(());
        }
        // Everyone saw the same mismatch: exchange (a prefix of) the values to name them.
        const SHOW: usize = 256;
        let mut shown = vec![0u8; SHOW + 8];
        let take = value.len().min(SHOW);
        shown[..take].copy_from_slice(&value[..take]);
        shown[SHOW..].copy_from_slice(&(take as u64).to_le_bytes());
        let values = self.gather_bytes(&shown)?;
        let describe = |rank: usize| {
            let c = &values[rank * (SHOW + 8)..(rank + 1) * (SHOW + 8)];
            let len = u64::from_le_bytes(c[SHOW..].try_into().expect("8 bytes")) as usize;
            let full = u64::from_le_bytes(
                gathered[rank * width + 32..(rank + 1) * width]
                    .try_into()
                    .expect("8 bytes"),
            ) as usize;
            let h = hex::encode(&gathered[rank * width..rank * width + 8]);
            let text = String::from_utf8_lossy(&c[..len.min(SHOW)]);
            let more = if full > len { "…" } else { "" };
            format!("rank {rank}: {text:?}{more} (sha256 {h}…)")
        };
        let mine = describe(self.rank);
        let other = (0..self.world_size)
            .find(|&r| gathered[r * width..(r + 1) * width] != digest[..])
            .unwrap_or(0);
        Err(Error::Dist(format!(
            "{what} differs across ranks: {mine} vs {}",
            describe(other)
        )))
    }

    fn gather_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let t = Tensor::from_slice(bytes).to_device(self.device());
        let all = self.all_gather(&t)?.to_device(Device::Cpu);
        let mut out = vec![0u8; all.numel()];
        all.f_copy_data(&mut out, all.numel())?;
        Ok(out)
    }
}

/// Flat gradient buffers that the parameters' `.grad` tensors alias (each with its parameter's
/// strides), so backward accumulates straight into them and [`GradBuckets::all_reduce`] sums them
/// over ranks with one collective per bucket and no packing copies. Zeroing the grads in place
/// (`Tensor::zero_grad`) keeps the aliasing; a grad replaced by another tensor is copied back in
/// and re-aliased before the all-reduce, so the result is right either way. The buckets keep the
/// process group alive. In a group of one rank they do nothing.
pub struct GradBuckets {
    raw: *mut ffi::BtGradBuckets,
    count: usize,
    secret: String,
}

// SAFETY: the shim's buckets are only touched through &self/&mut self calls that the group's
// mutex serializes; freed once in Drop.
unsafe impl Send for GradBuckets {}

impl GradBuckets {
    /// Number of flat buckets (0 for a single-rank group).
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// Sums the gradients over ranks, in place (no averaging).
    pub fn all_reduce(&mut self) -> Result<()> {
        if self.raw.is_null() {
            return Ok(());
        }
        // SAFETY: live bucket set.
        let err = unsafe { ffi::bt_grad_buckets_allreduce(self.raw) };
        ffi::take_error_redacted(err, "gradient all_reduce", &self.secret)
    }
}

impl Drop for GradBuckets {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: raw came from bt_grad_buckets_new and is freed once.
            unsafe { ffi::bt_grad_buckets_free(self.raw) };
            self.raw = std::ptr::null_mut();
        }
    }
}

/// Batch norm in training mode with statistics over the whole global batch (all ranks).
/// Forward and backward both call the process group (a C++ autograd function in the shim);
/// `weight`/`bias` get this rank's share of their gradients. Running statistics are updated
/// with the global mean and unbiased global variance, like `torch.nn.SyncBatchNorm`.
#[allow(clippy::too_many_arguments)]
pub fn sync_batch_norm(
    group: &ProcessGroup,
    input: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> Result<Tensor> {
    if group.single() {
        return Ok(input.f_batch_norm(
            weight,
            bias,
            Some(running_mean),
            Some(running_var),
            true,
            momentum,
            eps,
            false,
        )?);
    }
    let opt = |t: Option<&Tensor>| t.map(ffi::ptr).unwrap_or(std::ptr::null_mut());
    let mut out = std::ptr::null_mut();
    // SAFETY: live handles (nullable ones for absent tensors); `out` is a new tensor we own.
    let err = unsafe {
        ffi::bt_sync_batch_norm(
            group.raw,
            ffi::ptr(input),
            opt(weight),
            opt(bias),
            ffi::ptr(running_mean),
            ffi::ptr(running_var),
            momentum,
            eps,
            &mut out,
        )
    };
    group.check(err, "sync_batch_norm")?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Kind-agnostic helper for tests and callers: a tensor's bytes, e.g. for `check_agreement`.
pub fn shape_signature(named: &[(String, Vec<i64>, Kind)]) -> Vec<u8> {
    let mut s = String::new();
    for (name, shape, kind) in named {
        s.push_str(&format!("{name}:{shape:?}:{kind:?};"));
    }
    s.into_bytes()
}
