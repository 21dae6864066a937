//! Collectives over PyTorch's c10d (Gloo on CPU, NCCL on CUDA), driven through a small C++ shim.
//!
//! INTERFACE SKELETON: the signatures below are the contract other modules use; the dist work
//! fills in the bodies (C++ shim in `worker/csrc/`, compiled by `worker/build.rs`).
use std::time::Duration;

use tch::Tensor;

use crate::{Error, Result};

/// Where and how to meet the other ranks; handed out by the coordinator per attempt.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    /// Host of rank 0's TCPStore.
    pub master_addr: String,
    pub master_port: u16,
    pub timeout: Duration,
}

/// A process group over all ranks of one attempt.
pub struct ProcessGroup {
    rank: usize,
    world_size: usize,
}

impl ProcessGroup {
    /// Joins the group (rank 0 hosts the TCPStore). Blocks until all ranks arrive or the timeout.
    pub fn new(rv: &Rendezvous) -> Result<Self> {
        if rv.world_size == 1 {
            return Ok(ProcessGroup {
                rank: 0,
                world_size: 1,
            });
        }
        Err(Error::Dist("c10d shim not built yet".into()))
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    /// In-place sum over ranks.
    pub fn all_reduce_sum(&self, _t: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Gathers `t` from every rank, concatenated along dim 0 in rank order.
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.shallow_clone())
    }
    /// In-place broadcast from `root`.
    pub fn broadcast(&self, _t: &Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    pub fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Batch norm in training mode with statistics over the whole global batch (all ranks).
/// Forward and backward both call the process group (a C++ autograd function in the shim).
#[allow(clippy::too_many_arguments)]
pub fn sync_batch_norm(
    _group: &ProcessGroup,
    input: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> Result<Tensor> {
    Ok(input.f_batch_norm(
        weight,
        bias,
        Some(running_mean),
        Some(running_var),
        true,
        momentum,
        eps,
        false,
    )?)
}
