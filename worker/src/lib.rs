//! bt-worker: the worker daemon (agent), the trainer process, and the Barlow Twins library
//! (models, loss, optimizer, data, collectives, checkpoints, evaluation).
pub mod alloc;
pub mod error;

pub mod agent;
pub mod ipc;
pub mod trainer;

pub mod amp;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod eval;
pub mod export;
pub mod loss;
pub mod model;
pub mod optim;

pub use error::{Error, Result};
