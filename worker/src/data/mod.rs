//! Data: image sources, the two-view Barlow Twins augmentation and the sharded, resumable loader.
//!
//! - [`source`]: [`Source`] implementations (IDX / Fashion-MNIST, ImageFolder, synthetic) and
//!   [`open_source`] from a [`SourceSpec`]. Images are always 8-bit RGB (gray is replicated).
//! - [`augment`]: per-sample random parameters and the CPU crop/resize/flip.
//! - [`colour_device`]: the batched colour stage on the training device (colour jitter,
//!   grayscale, blur, solarize, normalize).
//! - [`colour_cpu`]: the same colour stage fused per image, run by the loader's threads when
//!   training on the CPU (`LoaderConfig::colour_on_cpu`).
//! - [`loader`]: [`Loader`] (per-rank two-view batches, deterministic in the seed, independent of
//!   world size and thread count, resumable at any step) and [`eval_batches`].
//!
//! Fashion-MNIST example:
//!
//! ```no_run
//! use bt_worker::data::*;
//! # fn main() -> bt_worker::Result<()> {
//! let spec = SourceSpec::FashionMnist { dir: "/usr/share/datasets/fashion-mnist".into() };
//! let train = open_source(&spec, Split::Train)?;
//! let cfg = LoaderConfig::new(256, 0, AugmentConfig::small(32));
//! let mut loader = Loader::new(train, cfg, 0)?;
//! let batch = loader.next_batch()?;
//! let (a, b) = batch.views(tch::Device::cuda_if_available())?;
//! # Ok(()) }
//! ```
/// Defines `fn $name(args) body` twice over: a baseline build and one compiled with AVX2
/// enabled, picked at run time by CPU detection, so the plain slice loops of `body` vectorize for
/// the wider registers where they exist. No FMA is enabled, so both copies compute the same bits.
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

pub mod augment;
pub mod bench;
pub mod colour_cpu;
pub mod colour_device;
pub mod eval;
pub mod loader;
pub mod resample;
pub mod source;

pub use augment::{AugmentConfig, CropBox, Jitter, View, ViewSample, IMAGENET_MEAN, IMAGENET_STD};
pub use eval::{eval_batches, EvalBatch, EvalTransform};
pub use loader::{Loader, LoaderConfig, Schedule, TwoViewBatch};
pub use source::{
    open_source, IdxSource, Image, ImageFolderSource, Source, SourceSpec, Split, Subset,
    SyntheticSource,
};
