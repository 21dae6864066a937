//! Raw bindings to the c10d shim (`worker/csrc/bt_dist.cpp`). Every fallible function returns
//! NULL on success or a malloc'd error message that [`take_error`] turns into an [`Error`].
use std::ffi::{c_char, c_int, CStr};

use torch_sys::C_tensor;

use crate::{Error, Result};

#[repr(C)]
pub struct BtPg {
    _private: [u8; 0],
}

#[repr(C)]
pub struct BtGradBuckets {
    _private: [u8; 0],
}

extern "C" {
    pub fn bt_dist_free_error(err: *mut c_char);
    #[allow(clippy::too_many_arguments)]
    pub fn bt_pg_new(
        backend: c_int,
        master_addr: *const c_char,
        master_port: u16,
        local_addr: *const c_char,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        device_index: c_int,
        master_listen_fd: c_int,
        store_prefix: *const c_char,
        out: *mut *mut BtPg,
    ) -> *mut c_char;
    pub fn bt_pg_free(pg: *mut BtPg);
    pub fn bt_pg_all_reduce_sum(pg: *mut BtPg, t: *mut C_tensor) -> *mut c_char;
    pub fn bt_pg_broadcast(pg: *mut BtPg, t: *mut C_tensor, root: c_int) -> *mut c_char;
    pub fn bt_pg_all_gather(
        pg: *mut BtPg,
        t: *mut C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    pub fn bt_pg_all_gather_into(
        pg: *mut BtPg,
        t: *mut C_tensor,
        out: *mut C_tensor,
    ) -> *mut c_char;
    pub fn bt_pg_barrier(pg: *mut BtPg) -> *mut c_char;
    pub fn bt_grad_buckets_new(
        pg: *mut BtPg,
        params: *const *mut C_tensor,
        n: i64,
        bucket_bytes: i64,
        overlap: c_int,
        out: *mut *mut BtGradBuckets,
    ) -> *mut c_char;
    pub fn bt_grad_buckets_set_overlap(b: *mut BtGradBuckets, overlap: c_int) -> *mut c_char;
    pub fn bt_grad_buckets_arm(b: *mut BtGradBuckets) -> *mut c_char;
    pub fn bt_grad_buckets_allreduce(b: *mut BtGradBuckets) -> *mut c_char;
    pub fn bt_grad_buckets_count(b: *mut BtGradBuckets) -> i64;
    pub fn bt_grad_buckets_started(b: *mut BtGradBuckets) -> i64;
    pub fn bt_grad_buckets_free(b: *mut BtGradBuckets);
    pub fn bt_pg_allreduce_grads(
        pg: *mut BtPg,
        params: *const *mut C_tensor,
        n: i64,
        bucket_bytes: i64,
    ) -> *mut c_char;
    pub fn bt_pg_broadcast_tensors(
        pg: *mut BtPg,
        tensors: *const *mut C_tensor,
        n: i64,
        root: c_int,
        bucket_bytes: i64,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub fn bt_sync_batch_norm(
        pg: *mut BtPg,
        inputs: *const *mut C_tensor,
        n: i64,
        weight: *mut C_tensor,
        bias: *mut C_tensor,
        running_mean: *mut C_tensor,
        running_var: *mut C_tensor,
        momentum: f64,
        eps: f64,
        outs: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// Turns the shim's error string into a Result, freeing it. `what` names the operation.
pub fn take_error(err: *mut c_char, what: &str) -> Result<()> {
    take_error_with(err, what, Error::Dist)
}

/// [`take_error`] with the error variant chosen by the caller.
pub fn take_error_with(err: *mut c_char, what: &str, wrap: fn(String) -> Error) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by the shim, owned by us.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { bt_dist_free_error(err) };
    Err(wrap(format!("{what}: {msg}")))
}

/// [`take_error`] for a group's calls: every occurrence of the store prefix (the attempt's
/// secret) in the shim's message is replaced, so that no error names it.
pub fn take_error_redacted(err: *mut c_char, what: &str, secret: &str) -> Result<()> {
    take_error(err, what).map_err(|e| match e {
        Error::Dist(m) => Error::Dist(redact(m, secret)),
        other => other,
    })
}

/// `msg` with every occurrence of `secret` replaced by a placeholder.
pub fn redact(msg: String, secret: &str) -> String {
    if secret.is_empty() || !msg.contains(secret) {
        msg
    } else {
        msg.replace(secret, "<store prefix>")
    }
}

/// tch hands out `*const` handles; the shim mutates tensor contents (never the handle).
pub fn ptr(t: &tch::Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}
