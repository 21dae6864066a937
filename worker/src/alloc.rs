//! The process's allocator: jemalloc, for libtorch's tensors as much as for Rust's own data.
//!
//! libtorch allocates CPU tensors with `posix_memalign`/`free` and keeps no cache of its own, so
//! with glibc's malloc every activation above the mmap threshold is a fresh `mmap` each step and
//! an `munmap` after it: the kernel faults in and zeroes the same gigabytes again every step
//! (measured on ResNet-50 at batch 16, 224²: 11.7 M minor faults and a third of the run in the
//! kernel). jemalloc is linked with unprefixed symbols, so it answers libtorch's `malloc` calls
//! too (the executable's definitions come first in symbol lookup), and `.cargo/config.toml` builds
//! it with `dirty_decay_ms:-1,muzzy_decay_ms:-1`: freed pages stay with the process and the next
//! step reuses them. The cost is that a process keeps its peak footprint until it exits, which
//! for a trainer is the footprint it needs anyway.

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's `opt.dirty_decay_ms` as this process runs it (−1: freed pages are never returned),
/// or `None` if it cannot be read.
pub fn dirty_decay_ms() -> Option<isize> {
    read_ctl(c"opt.dirty_decay_ms")
}

/// Reads jemalloc's control `name`, whose C type `T` stands for, or `None` if it cannot be read.
fn read_ctl<T: Copy + Default>(name: &std::ffi::CStr) -> Option<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>();
    // SAFETY: `name` is NUL-terminated, `value` and `len` describe a `T` (the control's type, as
    // the caller names it; jemalloc checks the length), and nothing is written (newp is null).
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            (&mut value as *mut T).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0 && len == std::mem::size_of::<T>()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_keeps_freed_pages() {
        assert_eq!(dirty_decay_ms(), Some(-1));
    }

    #[test]
    fn libtorch_allocates_through_jemalloc() {
        // A tensor's storage comes from libtorch's CPU allocator (posix_memalign): with jemalloc
        // answering it, jemalloc's count of allocated bytes grows by at least the tensor's size.
        let allocated = || {
            let mut epoch: u64 = 1;
            let mut len = std::mem::size_of::<u64>();
            // SAFETY: `epoch` is a u64 as the control expects; refreshes the statistics.
            unsafe {
                tikv_jemalloc_sys::mallctl(
                    c"epoch".as_ptr(),
                    (&mut epoch as *mut u64).cast(),
                    &mut len,
                    (&mut epoch as *mut u64).cast(),
                    len,
                )
            };
            read_ctl::<usize>(c"stats.allocated").expect("jemalloc's stats.allocated is readable")
        };
        let before = allocated();
        let t = tch::Tensor::zeros([64, 1024, 1024], (tch::Kind::Float, tch::Device::Cpu));
        let during = allocated();
        drop(t);
        assert!(
            during >= before + 64 * 1024 * 1024 * 4,
            "a 256 MiB tensor did not show in jemalloc's statistics: {before} -> {during}"
        );
    }
}
