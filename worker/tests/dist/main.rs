//! Multi-rank tests of the c10d shim over Gloo on loopback. Each rank runs in its own thread with
//! its own ProcessGroup (its own Gloo context and sockets), on a fresh port, with short timeouts.

mod collectives;
mod faults;
mod harness;
mod knn;
mod outsider;
mod overlap;
mod store;
mod sync_bn;
mod training;
mod views;
