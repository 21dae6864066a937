//! The trainer process (`bt-worker train`): one rank of one attempt of a job. It reads its
//! assignment (a prost `Assignment`) on stdin, trains, and writes `TrainerEvent`s to stdout.
//! Logs go to stderr; the daemon keeps them and sends the last lines with the exit report.
//!
//! Exit codes: 0 finished, 2 the job's own error (bad spec or data: no restart helps),
//! 3 an infrastructure error (collective timeout, lost peer, I/O), 143 stopped by SIGTERM.
pub mod bench;
mod job;
pub mod probe;
mod report;

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};

use bt_proto::Assignment;
use prost::Message;
use tracing::{error, info};

pub use job::{run, TrainerError};
pub use report::Reporter;

pub const EXIT_USER_ERROR: u8 = 2;
pub const EXIT_INFRA_ERROR: u8 = 3;
pub const EXIT_STOPPED: u8 = 143;

static STOP: AtomicBool = AtomicBool::new(false);

/// True once SIGTERM (or SIGINT) arrived: the loop stops at the next step boundary.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
}

/// Entry point of `bt-worker train`; returns the process exit code.
pub fn main(device_kind: &str) -> u8 {
    install_signal_handlers();
    let mut buf = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut buf) {
        error!(error = %e, "cannot read the assignment on stdin");
        return EXIT_INFRA_ERROR;
    }
    let a = match Assignment::decode(buf.as_slice()) {
        Ok(a) => a,
        Err(e) => {
            error!(error = %e, "the assignment on stdin is not a valid message");
            return EXIT_INFRA_ERROR;
        }
    };
    info!(job_id = %a.job_id, epoch = a.epoch, rank = a.rank, world_size = a.world_size, device_kind, "trainer starting");
    let mut reporter = Reporter::stdout();
    match run(&a, device_kind, &mut reporter) {
        Ok(job::Outcome::Finished) => {
            info!("trainer finished");
            0
        }
        Ok(job::Outcome::Stopped) => {
            info!("trainer stopped on request");
            EXIT_STOPPED
        }
        Err(e) => {
            error!("error: {e}");
            if e.is_user_error() {
                EXIT_USER_ERROR
            } else {
                EXIT_INFRA_ERROR
            }
        }
    }
}
