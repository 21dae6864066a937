//! In-process integration tests: `bt_coordinator::run` on 127.0.0.1:0 with a temporary database,
//! driven by the generated tonic clients and a scripted fake daemon.
mod auth;
mod elastic;
mod faults;
mod harness;
mod history;
mod lifecycle;
mod limits;
mod ops;
mod preemption;
mod process;
mod secured;
mod security;
mod watch;
mod watchdog;
