//! Optimizer: LARS with two parameter groups and the official learning-rate schedule.
pub mod lars;
pub mod schedule;

pub use lars::{Lars, LarsConfig, ParamGroup};
pub use schedule::LrSchedule;
