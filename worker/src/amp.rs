//! Mixed precision and memory layout (the `train.precision` and `train.memory_format` settings):
//! bf16 autocast for forward and backward with fp32 master weights, and channels-last images and
//! convolution weights. Both default to on for CUDA and off for CPU, where fp32 is exact; on a
//! CPU with native bf16 (AVX-512 BF16) bf16 + channels-last is much faster (ResNet-50 forward and
//! backward about 2.5× on the 2-core dev machine, see the README's benchmarks), so set them there
//! by hand. Backed by `worker/csrc/bt_amp.cpp` (tch does not expose these).
use std::ffi::{c_char, c_int};

use tch::{Device, Tensor};
use torch_sys::C_tensor;

use crate::dist::ffi_take_error;
use crate::{Error, Result};

extern "C" {
    fn bt_autocast_enter(
        device: c_int,
        dtype: c_int,
        prev_enabled: *mut c_int,
        prev_dtype: *mut c_int,
    ) -> *mut c_char;
    fn bt_autocast_exit(device: c_int, prev_enabled: c_int, prev_dtype: c_int) -> *mut c_char;
    fn bt_autocast_is_enabled(device: c_int) -> c_int;
    fn bt_to_channels_last(t: *mut C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    fn bt_is_channels_last(t: *mut C_tensor) -> c_int;
}

/// Numeric precision of the model's forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    /// bf16 autocast (matmuls and convolutions in bf16, reductions and norms as autocast
    /// decides); parameters, gradients and optimizer state stay fp32.
    Bf16,
}

/// Memory layout of 4-d activations and convolution weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryFormat {
    Contiguous,
    ChannelsLast,
}

impl Precision {
    /// Parses `train.precision` for `device` ("auto": bf16 on CUDA, fp32 elsewhere).
    pub fn resolve(setting: &str, device: Device) -> Result<Self> {
        match setting {
            "auto" if device.is_cuda() => Ok(Precision::Bf16),
            "auto" | "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::Config(format!(
                "train.precision: must be auto, fp32 or bf16, got {other:?}"
            ))),
        }
    }
}

impl MemoryFormat {
    /// Parses `train.memory_format` for `device` ("auto": channels-last on CUDA only).
    pub fn resolve(setting: &str, device: Device) -> Result<Self> {
        match setting {
            "auto" if device.is_cuda() => Ok(MemoryFormat::ChannelsLast),
            "auto" | "contiguous" => Ok(MemoryFormat::Contiguous),
            "channels-last" => Ok(MemoryFormat::ChannelsLast),
            other => Err(Error::Config(format!(
                "train.memory_format: must be auto, contiguous or channels-last, got {other:?}"
            ))),
        }
    }

    /// `t` in this layout (4-d tensors only; others are returned as they are).
    pub fn apply(self, t: &Tensor) -> Result<Tensor> {
        match self {
            MemoryFormat::ChannelsLast if t.dim() == 4 => to_channels_last(t),
            _ => Ok(t.shallow_clone()),
        }
    }

    /// Converts every 4-d tensor in `tensors` (convolution weights) to this layout in place
    /// (`set_data`: the variables and their autograd identity stay the same).
    pub fn apply_to_weights(self, tensors: &[Tensor]) -> Result<()> {
        if self == MemoryFormat::Contiguous {
            return Ok(());
        }
        for t in tensors.iter().filter(|t| t.dim() == 4) {
            let cl = tch::no_grad(|| to_channels_last(&t.detach()))?;
            t.shallow_clone().set_data(&cl);
        }
        Ok(())
    }
}

fn device_code(device: Device) -> c_int {
    if device.is_cuda() {
        1
    } else {
        0
    }
}

/// Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX BF16, from /proc/cpuinfo's
/// flags; false where that file is absent), where bf16 autocast with channels-last runs the
/// model about 2x faster than fp32. Elsewhere bf16 is emulated and slower.
pub fn cpu_has_native_bf16() -> bool {
    static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NATIVE.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .flat_map(|l| l.split_whitespace())
                .any(|f| f == "avx512_bf16" || f == "amx_bf16")
        })
    })
}

/// A channels-last copy of a 4-d tensor (itself when it already is one); differentiable.
pub fn to_channels_last(t: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: live tensor handle; on success `out` is a new at::Tensor we own.
    let err = unsafe { bt_to_channels_last(t.as_ptr() as *mut C_tensor, &mut out) };
    ffi_take_error(err, "channels-last", Error::Other)?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Whether `t` is a 4-d tensor laid out channels-last.
pub fn is_channels_last(t: &Tensor) -> bool {
    // SAFETY: live tensor handle, read only.
    unsafe { bt_is_channels_last(t.as_ptr() as *mut C_tensor) != 0 }
}

/// Whether autocast is on for `device`'s type on this thread.
pub fn autocast_enabled(device: Device) -> bool {
    // SAFETY: reads thread-local state.
    unsafe { bt_autocast_is_enabled(device_code(device)) != 0 }
}

/// Runs `f` with bf16 autocast on `device`'s type when `precision` is bf16 (plainly otherwise),
/// restoring the previous autocast state afterwards, also when `f` fails.
pub fn with_autocast<T>(
    precision: Precision,
    device: Device,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if precision == Precision::Fp32 {
        return f();
    }
    let code = device_code(device);
    let (mut prev_enabled, mut prev_dtype) = (0, 0);
    // SAFETY: out pointers valid for the call; sets thread-local state only.
    let err = unsafe { bt_autocast_enter(code, 0, &mut prev_enabled, &mut prev_dtype) };
    ffi_take_error(err, "autocast", Error::Other)?;
    let out = f();
    // SAFETY: restores the state saved by the matching enter.
    let err = unsafe { bt_autocast_exit(code, prev_enabled, prev_dtype) };
    let restored = ffi_take_error(err, "autocast", Error::Other);
    let out = out?;
    restored?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_means_gpu_settings_on_cuda_only() {
        let cuda = Device::Cuda(0);
        assert_eq!(Precision::resolve("auto", cuda).unwrap(), Precision::Bf16);
        assert_eq!(
            Precision::resolve("auto", Device::Cpu).unwrap(),
            Precision::Fp32
        );
        assert_eq!(
            Precision::resolve("bf16", Device::Cpu).unwrap(),
            Precision::Bf16
        );
        assert!(Precision::resolve("fp16", cuda).is_err());
        assert_eq!(
            MemoryFormat::resolve("auto", cuda).unwrap(),
            MemoryFormat::ChannelsLast
        );
        assert_eq!(
            MemoryFormat::resolve("auto", Device::Cpu).unwrap(),
            MemoryFormat::Contiguous
        );
        assert!(MemoryFormat::resolve("nhwc", Device::Cpu).is_err());
    }

    #[test]
    fn channels_last_keeps_values_and_autograd() {
        let w =
            Tensor::randn([4, 3, 3, 3], (tch::Kind::Float, Device::Cpu)).set_requires_grad(true);
        let before = w.detach().copy();
        MemoryFormat::ChannelsLast
            .apply_to_weights(std::slice::from_ref(&w))
            .unwrap();
        assert!(is_channels_last(&w) && w.requires_grad());
        assert!(w.detach().equal(&before));
        let x = Tensor::randn([2, 3, 5, 5], (tch::Kind::Float, Device::Cpu));
        let y = MemoryFormat::ChannelsLast.apply(&x).unwrap();
        assert!(is_channels_last(&y) && y.equal(&x));
        // 2-d tensors pass through
        let v = Tensor::ones([3, 2], (tch::Kind::Float, Device::Cpu));
        assert!(!is_channels_last(
            &MemoryFormat::ChannelsLast.apply(&v).unwrap()
        ));
        // autocast off stays off
        assert!(!autocast_enabled(Device::Cpu));
        let r = with_autocast(Precision::Bf16, Device::Cpu, || -> Result<()> {
            Err(Error::Other("inner failure".into()))
        });
        assert!(r.is_err() && !autocast_enabled(Device::Cpu));
    }
}
