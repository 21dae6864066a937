//! Collectives over PyTorch's c10d (Gloo on CPU, NCCL on CUDA), driven through a small C++ shim
//! (`worker/csrc/bt_dist.cpp`, compiled by `worker/build.rs`).
//!
//! Every rank must issue the same collectives in the same order. A peer that dies or stops
//! participating makes the others fail with [`Error::Dist`] within the rendezvous timeout.
pub mod bench;
mod buckets;
mod ffi;
mod rendezvous;

pub use buckets::GradBuckets;
pub(crate) use ffi::take_error_with as ffi_take_error;
pub use rendezvous::{
    validate_store_prefix, Rendezvous, DEFAULT_STORE_PREFIX, MAX_STORE_PREFIX_LEN,
};

use std::ffi::CString;
use std::os::fd::{IntoRawFd, OwnedFd};

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

/// Batch norm in training mode with statistics over the whole global batch (all ranks), of one or
/// more views (batches) through the same layer. Each view is normalized with its own global
/// statistics, as separate calls in order would (the same values, running statistics updated view
/// by view), but the ranks meet once for all views' statistics in forward and once for their
/// gradients in backward. Forward and backward both call the process group (a C++ autograd
/// function in the shim); `weight`/`bias` get this rank's share of their gradients. Running
/// statistics are updated with the global mean and unbiased global variance, like
/// `torch.nn.SyncBatchNorm`.
#[allow(clippy::too_many_arguments)]
pub fn sync_batch_norm(
    group: &ProcessGroup,
    inputs: &[Tensor],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> Result<Vec<Tensor>> {
    if group.single() {
        return inputs
            .iter()
            .map(|x| {
                Ok(x.f_batch_norm(
                    weight,
                    bias,
                    Some(running_mean),
                    Some(running_var),
                    true,
                    momentum,
                    eps,
                    false,
                )?)
            })
            .collect();
    }
    let opt = |t: Option<&Tensor>| t.map(ffi::ptr).unwrap_or(std::ptr::null_mut());
    let ins: Vec<_> = inputs.iter().map(ffi::ptr).collect();
    let mut outs = vec![std::ptr::null_mut(); inputs.len()];
    // SAFETY: live handles (nullable ones for absent tensors); `outs` has one slot per input and
    // receives new tensors we own (all of them, or none on error).
    let err = unsafe {
        ffi::bt_sync_batch_norm(
            group.raw,
            ins.as_ptr(),
            ins.len() as i64,
            opt(weight),
            opt(bias),
            ffi::ptr(running_mean),
            ffi::ptr(running_var),
            momentum,
            eps,
            outs.as_mut_ptr(),
        )
    };
    group.check(err, "sync_batch_norm")?;
    Ok(outs
        .into_iter()
        .map(|t| unsafe { Tensor::from_ptr(t) })
        .collect())
}

/// Kind-agnostic helper for tests and callers: a tensor's bytes, e.g. for `check_agreement`.
pub fn shape_signature(named: &[(String, Vec<i64>, Kind)]) -> Vec<u8> {
    let mut s = String::new();
    for (name, shape, kind) in named {
        s.push_str(&format!("{name}:{shape:?}:{kind:?};"));
    }
    s.into_bytes()
}
