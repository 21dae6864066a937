//! bt-coordinator: the gRPC coordinator of bt — job and worker services, the durable state store,
//! the gang scheduler, rendezvous hand-out and metric fan-out.
pub mod auth;
pub mod backup;
pub mod config;
pub mod core;
pub mod error;
pub mod metrics;
pub mod scheduler;
pub mod secrets;
mod server;
mod service;
pub mod store;
pub mod view;

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
pub use server::run;
