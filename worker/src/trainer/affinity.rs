//! CPU placement of a trainer process (`train.pin_cpus`): rank r gets cores of its own, and so do
//! the threads it creates afterwards (libtorch's intra-op pool, the data workers, Gloo's I/O
//! loop), which inherit the mask of the thread that spawns them.
//!
//! A pinned rank shares its cores with Gloo's TCP I/O thread. When a peer's data arrives before
//! this rank has posted the matching receive (it is still computing: SyncBN meets its peers at
//! every layer), that thread polls the readable socket until the receive is posted, taking the
//! core from the very computation it waits for. [`demote_collective_io`] puts it in the idle
//! scheduling class: it runs whenever the rank waits, and never in its way.
use std::io;

use tracing::{info, warn};

/// Bytes of a CPU set, and the cores it can name.
const SET_BYTES: usize = std::mem::size_of::<libc::cpu_set_t>();
const SET_CORES: usize = 8 * SET_BYTES;

/// The cores rank `rank` takes: `threads` consecutive entries of `allowed`, starting at
/// `rank · threads`, wrapping around. `None` when there is nothing to pin: no threads given, or
/// at least as many threads as allowed cores (the rank would get all of them anyway).
pub fn cores_for(rank: usize, threads: usize, allowed: &[usize]) -> Option<Vec<usize>> {
    if threads == 0 || threads >= allowed.len() {
        return None;
    }
    let first = rank * threads;
    Some(
        (first..first + threads)
            .map(|i| allowed[i % allowed.len()])
            .collect(),
    )
}

/// The cores this process may run on (its affinity mask, which cgroups and cpusets narrow).
pub fn allowed_cores() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sched_getaffinity(0, SET_BYTES, &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: every index is below the set's capacity.
    Ok((0..SET_CORES)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Restricts the calling thread, and every thread it creates from now on, to `cores`.
pub fn pin_current_thread(cores: &[usize]) -> io::Result<()> {
    // SAFETY: as in allowed_cores; CPU_SET is given indices below the set's capacity only.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cores {
        if c >= SET_CORES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("core {c} is beyond the {SET_CORES} a CPU set holds"),
            ));
        }
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let rc = unsafe { libc::sched_setaffinity(0, SET_BYTES, &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins this trainer as `train.pin_cpus` asks, before it starts any thread of its own. A
/// failure costs speed, not the job: it is logged and the trainer runs unpinned.
pub fn pin_rank(rank: usize, threads: usize) {
    let allowed = match allowed_cores() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "train.pin_cpus: cannot read this process's CPU affinity; not pinning");
            return;
        }
    };
    let Some(cores) = cores_for(rank, threads, &allowed) else {
        info!(
            rank,
            threads,
            allowed = allowed.len(),
            "train.pin_cpus: not pinning (needs train.torch_threads > 0 and fewer than the cores allowed)"
        );
        return;
    };
    match pin_current_thread(&cores) {
        Ok(()) => info!(rank, ?cores, "train.pin_cpus: trainer pinned"),
        Err(e) => warn!(error = %e, rank, ?cores, "train.pin_cpus: cannot pin; running unpinned"),
    }
}

/// The name Gloo gives its TCP transport's event-loop threads.
const GLOO_IO_THREAD: &str = "gloo_tcp_loop";

/// Moves this process's Gloo I/O threads to the idle scheduling class (SCHED_IDLE: they run only
/// when nothing else on their cores is runnable). Returns how many were moved.
pub fn demote_collective_io() -> io::Result<usize> {
    let mut moved = 0;
    for entry in std::fs::read_dir("/proc/self/task")? {
        let entry = entry?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != GLOO_IO_THREAD {
            continue;
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: tid names a thread of this process; lowering a thread's priority needs no
        // privilege.
        if unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) } != 0 {
            return Err(io::Error::last_os_error());
        }
        moved += 1;
    }
    Ok(moved)
}

/// [`demote_collective_io`] for a pinned trainer, once its process group exists; a failure is
/// logged and costs speed only.
pub fn demote_collective_io_logged() {
    match demote_collective_io() {
        Ok(n) => info!(
            threads = n,
            "train.pin_cpus: Gloo I/O threads in the idle class"
        ),
        Err(e) => warn!(error = %e, "train.pin_cpus: cannot lower the Gloo I/O threads' priority"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_get_disjoint_cores_and_wrap_around() {
        let allowed = [0, 1, 2, 3, 6, 7];
        assert_eq!(cores_for(0, 2, &allowed), Some(vec![0, 1]));
        assert_eq!(cores_for(1, 2, &allowed), Some(vec![2, 3]));
        assert_eq!(cores_for(2, 2, &allowed), Some(vec![6, 7]));
        assert_eq!(cores_for(3, 2, &allowed), Some(vec![0, 1]));
        assert_eq!(cores_for(1, 1, &[0, 1]), Some(vec![1]));
        // nothing to pin: no thread count, or the rank would get every core anyway
        assert_eq!(cores_for(0, 0, &allowed), None);
        assert_eq!(cores_for(0, 2, &[0, 1]), None);
    }

    #[test]
    fn pinning_a_thread_narrows_its_mask_and_its_children_inherit_it() {
        std::thread::spawn(|| {
            let allowed = allowed_cores().unwrap();
            assert!(!allowed.is_empty());
            let one = [allowed[allowed.len() - 1]];
            pin_current_thread(&one).unwrap();
            assert_eq!(allowed_cores().unwrap(), one);
            let child = std::thread::spawn(|| allowed_cores().unwrap())
                .join()
                .unwrap();
            assert_eq!(child, one);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn only_threads_named_like_gloo_io_are_demoted() {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<libc::c_int>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let io = std::thread::Builder::new()
            .name(GLOO_IO_THREAD.into())
            .spawn(move || {
                // SAFETY: querying the calling thread's policy.
                ready_tx
                    .send(unsafe { libc::sched_getscheduler(0) })
                    .unwrap();
                go_rx.recv().unwrap();
                unsafe { libc::sched_getscheduler(0) }
            })
            .unwrap();
        assert_eq!(ready_rx.recv().unwrap(), libc::SCHED_OTHER);
        assert!(demote_collective_io().unwrap() >= 1);
        go_tx.send(()).unwrap();
        assert_eq!(io.join().unwrap(), libc::SCHED_IDLE);
        // SAFETY: as above, for this (test) thread, which keeps the normal class
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }
}
