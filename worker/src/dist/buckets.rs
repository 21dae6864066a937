//! Gradient bucketing: summing the gradients over ranks in flat buckets, either packed per call
//! ([`ProcessGroup::allreduce_grads`]) or in persistent buffers the grads alias ([`GradBuckets`]).
use tch::Tensor;

use super::{ffi, ProcessGroup};
use crate::Result;

impl ProcessGroup {
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
