//! CPU placement of a trainer process (`train.pin_cpus`): rank r gets cores of its own, and so do
//! the threads it creates afterwards (libtorch's intra-op pool, the data workers, Gloo's I/O
//! loop), which inherit the mask of the thread that spawns them.
use std::io;

use tracing::{info, warn};

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
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: every index is below the set's capacity.
    Ok((0..max)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Restricts the calling thread, and every thread it creates from now on, to `cores`.
pub fn pin_current_thread(cores: &[usize]) -> io::Result<()> {
    // SAFETY: as in allowed_cores; CPU_SET is given indices below the set's capacity only.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &c in cores {
        if c >= max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("core {c} is beyond the {max} a CPU set holds"),
            ));
        }
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
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
}
