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

    /// Persistent gradient buckets over `params` (see [`GradBuckets`]), with overlap on; build
    /// them once, after the parameters reached their final device and memory format.
    pub fn grad_buckets(&self, params: &[Tensor], bucket_bytes: usize) -> Result<GradBuckets> {
        self.grad_buckets_with(params, bucket_bytes, true)
    }

    /// [`ProcessGroup::grad_buckets`] with overlap on or off (see [`GradBuckets::set_overlap`]).
    pub fn grad_buckets_with(
        &self,
        params: &[Tensor],
        bucket_bytes: usize,
        overlap: bool,
    ) -> Result<GradBuckets> {
        if self.single() {
            return Ok(GradBuckets {
                raw: std::ptr::null_mut(),
                count: 0,
                overlap,
                secret: String::new(),
            });
        }
        let ptrs: Vec<_> = params.iter().map(ffi::ptr).collect();
        let bucket = i64::try_from(bucket_bytes.max(1)).unwrap_or(i64::MAX);
        let mut raw = std::ptr::null_mut();
        // SAFETY: live handles; the array outlives the call; `raw` is ours on success.
        let err = unsafe {
            ffi::bt_grad_buckets_new(
                self.raw,
                ptrs.as_ptr(),
                ptrs.len() as i64,
                bucket,
                overlap.into(),
                &mut raw,
            )
        };
        self.check(err, "gradient buckets")?;
        // SAFETY: raw is a live bucket set.
        let count = unsafe { ffi::bt_grad_buckets_count(raw) } as usize;
        Ok(GradBuckets {
            raw,
            count,
            overlap,
            secret: self.secret.clone(),
        })
    }
}

/// Flat gradient buffers that the parameters' `.grad` tensors alias (each with its parameter's
/// strides), so backward accumulates straight into them and the buckets are summed over ranks
/// with one collective each and no packing copies. Zeroing the grads in place
/// (`Tensor::zero_grad`) keeps the aliasing; a grad replaced by another tensor is copied back in
/// and re-aliased before its bucket is summed, and a parameter without a grad contributes zeros,
/// so the result is right either way. The buckets keep the process group alive. In a group of one
/// rank they do nothing.
///
/// Overlap with backward: the buckets are laid out over the parameters in reverse order (the
/// order backward reaches them in). After [`GradBuckets::arm`], a hook on every parameter (run by
/// autograd once the parameter's gradient of that backward is complete) counts the parameters of
/// each bucket, and a complete bucket's all-reduce starts at once, in the middle of backward,
/// after all earlier buckets' (the same order on every rank). [`GradBuckets::all_reduce`] starts
/// the rest (buckets holding a parameter that got no gradient) and waits for all of them. A step:
/// `arm()`, zero the grads, one backward, `all_reduce()`. Without `arm()` (or with overlap off)
/// everything is summed in `all_reduce()`, so several backward passes may accumulate first.
pub struct GradBuckets {
    raw: *mut ffi::BtGradBuckets,
    count: usize,
    overlap: bool,
    secret: String,
}

// SAFETY: the shim's buckets are only touched through &self/&mut self calls and autograd's hooks,
// which the shim's own mutex serializes; freed once in Drop.
unsafe impl Send for GradBuckets {}

impl GradBuckets {
    /// Number of flat buckets (0 for a single-rank group).
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether an armed backward starts the buckets' all-reduces as their gradients complete.
    pub fn overlap(&self) -> bool {
        self.overlap
    }

    /// Turns the overlap with backward on or off (off: [`GradBuckets::all_reduce`] sums every
    /// bucket, one after the other started, then waits). Takes effect at the next `arm()`.
    pub fn set_overlap(&mut self, on: bool) -> Result<()> {
        self.overlap = on;
        if self.raw.is_null() {
            return Ok(());
        }
        // SAFETY: live bucket set.
        let err = unsafe { ffi::bt_grad_buckets_set_overlap(self.raw, on.into()) };
        ffi::take_error_redacted(err, "gradient buckets", &self.secret)
    }

    /// Declares that the next backward is the one whose gradients [`GradBuckets::all_reduce`]
    /// sums: with overlap on, its hooks start each bucket's all-reduce as soon as the bucket's
    /// gradients are complete. Exactly one backward must follow before `all_reduce()` (a second
    /// one would accumulate into buckets already being summed: `all_reduce()` then fails). Waits
    /// for anything a previous, unfinished step started.
    pub fn arm(&mut self) -> Result<()> {
        if self.raw.is_null() {
            return Ok(());
        }
        // SAFETY: live bucket set.
        let err = unsafe { ffi::bt_grad_buckets_arm(self.raw) };
        ffi::take_error_redacted(err, "gradient all_reduce", &self.secret)
    }

    /// Buckets whose all-reduce has started in this step (during backward, with overlap) and not
    /// been waited for yet.
    pub fn started(&self) -> usize {
        if self.raw.is_null() {
            return 0;
        }
        // SAFETY: live bucket set.
        unsafe { ffi::bt_grad_buckets_started(self.raw) as usize }
    }

    /// Sums the gradients over ranks, in place (no averaging): starts the buckets not started
    /// during backward, in order, and waits for every one.
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
            // SAFETY: raw came from bt_grad_buckets_new and is freed once; the shim removes its
            // hooks from the parameters (and any left behind do nothing).
            unsafe { ffi::bt_grad_buckets_free(self.raw) };
            self.raw = std::ptr::null_mut();
        }
    }
}
