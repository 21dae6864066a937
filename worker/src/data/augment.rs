//! The two asymmetric Barlow Twins views (BYOL's augmentations; ../shared/design/BARLOW_TWINS.md).
//!
//! The work is split in two stages so that the expensive per-pixel colour operations run batched on
//! the training device while everything stays deterministic given the seed:
//!
//! 1. **Loader side (CPU, per sample)**: [`sample_view`] draws *all* random parameters of a view from
//!    the sample's RNG (crop box, flip, colour-jitter factors and order, grayscale, blur σ,
//!    solarization); [`resample_chw`](super::resample::resample_chw) then crops, resizes (bicubic,
//!    antialiased like PIL) and flips the decoded image into u8 CHW.
//! 2. **Colour stage**: colour jitter, grayscale, Gaussian blur and solarization with the
//!    per-sample parameters, then normalization; float32, NCHW. Batched on the training device by
//!    [`device_stage`](super::colour_device::device_stage), or fused per image on the loader's
//!    threads by [`colour_view`](super::colour_cpu::colour_view) when training on the CPU.
//!
//! Formulas follow torchvision (`transforms.RandomResizedCrop.get_params`, `ColorJitter.get_params`,
//! and `transforms._functional_tensor` for the colour operations and the blur), on float images in
//! [0, 1]. Differences from the official (PIL-based) pipeline, all sub-quantization-level or
//! documented here: the colour stage runs in float without re-quantizing to 8 bits between
//! operations; the blur is torchvision's Gaussian kernel (size ≈ 10% of the crop, reflect padding)
//! rather than PIL's box-blur approximation; solarization inverts values ≥ 128/255.

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which of the two asymmetric views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    A,
    B,
}

impl View {
    fn index(self) -> usize {
        match self {
            View::A => 0,
            View::B => 1,
        }
    }
}

/// Augmentation settings. Defaults are the paper's ImageNet settings (crop 224, blur on); for
/// 28/32-pixel data use [`AugmentConfig::small`] (crop = image size, no blur).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Output side length S of both views.
    pub crop_size: usize,
    /// Random resized crop: area fraction range and aspect-ratio range.
    pub min_scale: f64,
    pub max_scale: f64,
    pub min_ratio: f64,
    pub max_ratio: f64,
    pub flip_p: f64,
    /// Probability of applying colour jitter, and its strengths (torchvision ColorJitter).
    pub jitter_p: f64,
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    pub grayscale_p: f64,
    /// Master switch for Gaussian blur (off for small images).
    pub blur: bool,
    /// Blur probability for view A and view B.
    pub blur_p: [f64; 2],
    /// σ is uniform in this range.
    pub blur_sigma: [f64; 2],
    /// Odd kernel size; `None` = the odd number nearest above 10% of `crop_size` (23 at 224).
    pub blur_kernel: Option<usize>,
    /// Solarization probability for view A and view B.
    pub solarize_p: [f64; 2],
    /// Random erasing (not in the paper's recipe; 0 = off): the probability that a view gets one
    /// rectangle of `erase_scale` of its area, aspect ratio in `erase_ratio`, filled with a random
    /// grey level. Applied to the cropped 8-bit view, before the colour stage.
    pub erase_p: f64,
    pub erase_scale: [f64; 2],
    pub erase_ratio: [f64; 2],
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            crop_size: 224,
            min_scale: 0.08,
            max_scale: 1.0,
            min_ratio: 3.0 / 4.0,
            max_ratio: 4.0 / 3.0,
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            blur: true,
            blur_p: [1.0, 0.1],
            blur_sigma: [0.1, 2.0],
            blur_kernel: None,
            solarize_p: [0.0, 0.2],
            erase_p: 0.0,
            erase_scale: [0.02, 0.25],
            erase_ratio: [0.3, 3.3],
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl AugmentConfig {
    /// The paper's ImageNet settings (same as `Default`).
    pub fn imagenet() -> Self {
        Self::default()
    }

    /// Settings for small images (CIFAR / Fashion-MNIST): crop to `crop_size`, no blur.
    pub fn small(crop_size: usize) -> Self {
        AugmentConfig {
            crop_size,
            blur: false,
            ..Self::default()
        }
    }

    /// The blur kernel size in use.
    pub fn blur_kernel_size(&self) -> usize {
        self.blur_kernel.unwrap_or_else(|| {
            let k = (self.crop_size / 10).max(3);
            k | 1
        })
    }

    /// Checks ranges; errors name the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("augment.{m}")));
        if self.crop_size == 0 {
            return bad("crop_size must be positive".into());
        }
        if !(0.0 < self.min_scale && self.min_scale <= self.max_scale && self.max_scale <= 1.0) {
            return bad(format!(
                "min_scale/max_scale: need 0 < {} <= {} <= 1",
                self.min_scale, self.max_scale
            ));
        }
        if !(0.0 < self.min_ratio && self.min_ratio <= self.max_ratio) {
            return bad(format!(
                "min_ratio/max_ratio: need 0 < {} <= {}",
                self.min_ratio, self.max_ratio
            ));
        }
        let probs = [
            ("flip_p", self.flip_p),
            ("jitter_p", self.jitter_p),
            ("grayscale_p", self.grayscale_p),
            ("blur_p[0]", self.blur_p[0]),
            ("blur_p[1]", self.blur_p[1]),
            ("solarize_p[0]", self.solarize_p[0]),
            ("solarize_p[1]", self.solarize_p[1]),
            ("erase_p", self.erase_p),
        ];
        for (name, p) in probs {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name}: probability {p} outside [0, 1]"));
            }
        }
        if self.brightness < 0.0 || self.contrast < 0.0 || self.saturation < 0.0 {
            return bad("brightness/contrast/saturation must be >= 0".into());
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return bad(format!("hue: {} outside [0, 0.5]", self.hue));
        }
        if self.blur {
            let k = self.blur_kernel_size();
            if k.is_multiple_of(2) {
                return bad(format!("blur_kernel: {k} must be odd"));
            }
            if k / 2 >= self.crop_size {
                return bad(format!(
                    "blur_kernel: {k} too large for crop_size {} (reflect padding)",
                    self.crop_size
                ));
            }
            if !(0.0 < self.blur_sigma[0] && self.blur_sigma[0] <= self.blur_sigma[1]) {
                return bad("blur_sigma: need 0 < min <= max".into());
            }
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            return bad("std must be positive".into());
        }
        Ok(())
    }
}

/// A crop rectangle in source pixels (torchvision's `i, j, h, w`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

impl CropBox {
    /// The whole `height × width` image.
    pub fn whole(height: usize, width: usize) -> Self {
        CropBox {
            top: 0,
            left: 0,
            height,
            width,
        }
    }
}

/// Colour-jitter parameters of one sample: the op order (0 brightness, 1 contrast, 2 saturation,
/// 3 hue; a permutation as in torchvision's `randperm(4)`) and the factors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Jitter {
    pub order: [u8; 4],
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

/// All random parameters of one view of one sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ViewSample {
    pub crop: CropBox,
    pub flip: bool,
    pub jitter: Option<Jitter>,
    pub grayscale: bool,
    pub blur_sigma: Option<f32>,
    pub solarize: bool,
    /// The erased rectangle in output pixels and its grey level, if any.
    pub erase: Option<(CropBox, u8)>,
}

/// An erasing rectangle in an `s × s` view (torchvision's `RandomErasing.get_params`: up to ten
/// tries for a box that fits), or `None` when none fits.
fn sample_erase<R: Rng>(cfg: &AugmentConfig, s: usize, rng: &mut R) -> Option<(CropBox, u8)> {
    let area = (s * s) as f64;
    let (lr0, lr1) = (cfg.erase_ratio[0].ln(), cfg.erase_ratio[1].ln());
    for _ in 0..10 {
        let target = area * uniform(rng, cfg.erase_scale[0], cfg.erase_scale[1]);
        let ratio = uniform(rng, lr0, lr1).exp();
        let h = (target * ratio).sqrt().round() as usize;
        let w = (target / ratio).sqrt().round() as usize;
        if h == 0 || w == 0 || h >= s || w >= s {
            continue;
        }
        let top = rng.gen_range(0..=s - h);
        let left = rng.gen_range(0..=s - w);
        let value = rng.gen::<u8>();
        return Some((
            CropBox {
                top,
                left,
                height: h,
                width: w,
            },
            value,
        ));
    }
    None
}

/// Fills `sample.erase`'s rectangle of a u8 CHW view (`channels × s × s`) with its grey level.
pub fn apply_erase(sample: &ViewSample, s: usize, chw: &mut [u8]) {
    let Some((b, value)) = sample.erase else {
        return;
    };
    for plane in chw.chunks_mut(s * s) {
        for row in plane.chunks_mut(s).skip(b.top).take(b.height) {
            row[b.left..b.left + b.width].fill(value);
        }
    }
}

fn uniform<R: Rng>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

/// Python's `round` (half to even), as torchvision uses it for crop sizes.
pub(super) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// torchvision `RandomResizedCrop.get_params`: ten tries at a random area fraction and log-uniform
/// aspect ratio, then the central crop clamped to the ratio range.
pub fn sample_crop<R: Rng>(
    cfg: &AugmentConfig,
    height: usize,
    width: usize,
    rng: &mut R,
) -> CropBox {
    let area = (height * width) as f64;
    let (lr0, lr1) = (cfg.min_ratio.ln(), cfg.max_ratio.ln());
    for _ in 0..10 {
        let target = area * uniform(rng, cfg.min_scale, cfg.max_scale);
        let ratio = uniform(rng, lr0, lr1).exp();
        let w = round_half_even((target * ratio).sqrt()) as usize;
        let h = round_half_even((target / ratio).sqrt()) as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.gen_range(0..=height - h);
            let left = rng.gen_range(0..=width - w);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < cfg.min_ratio {
        let w = width;
        (w, round_half_even(w as f64 / cfg.min_ratio) as usize)
    } else if in_ratio > cfg.max_ratio {
        let h = height;
        (round_half_even(h as f64 * cfg.max_ratio) as usize, h)
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// Draws every random parameter of one view, in a fixed order: crop, flip, jitter (apply?, then
/// factors and order when applied), grayscale, blur (apply?, σ), solarize.
pub fn sample_view<R: Rng>(
    cfg: &AugmentConfig,
    view: View,
    height: usize,
    width: usize,
    rng: &mut R,
) -> ViewSample {
    let crop = sample_crop(cfg, height, width, rng);
    let flip = rng.gen::<f64>() < cfg.flip_p;
    let jitter = (rng.gen::<f64>() < cfg.jitter_p).then(|| {
        let mut order = [0u8, 1, 2, 3];
        order.shuffle(rng);
        let factor = |rng: &mut R, s: f64| uniform(rng, (1.0 - s).max(0.0), 1.0 + s) as f32;
        Jitter {
            order,
            brightness: factor(rng, cfg.brightness),
            contrast: factor(rng, cfg.contrast),
            saturation: factor(rng, cfg.saturation),
            hue: uniform(rng, -cfg.hue, cfg.hue) as f32,
        }
    });
    let grayscale = rng.gen::<f64>() < cfg.grayscale_p;
    let blur_sigma = (cfg.blur && rng.gen::<f64>() < cfg.blur_p[view.index()])
        .then(|| uniform(rng, cfg.blur_sigma[0], cfg.blur_sigma[1]) as f32);
    let solarize = rng.gen::<f64>() < cfg.solarize_p[view.index()];
    // Drawn last, and only when erasing is on, so that runs without it see the same stream.
    let erase = (cfg.erase_p > 0.0 && rng.gen::<f64>() < cfg.erase_p)
        .then(|| sample_erase(cfg, cfg.crop_size, rng))
        .flatten();
    ViewSample {
        crop,
        flip,
        jitter,
        grayscale,
        blur_sigma,
        solarize,
        erase,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    /// Erasing draws nothing when off (the stream of a run without it is unchanged), and when on
    /// its boxes fit the view, cover 2-25 % of it and fill every channel with one grey level.
    #[test]
    fn erasing_is_off_by_default_and_fits_when_on() {
        let cfg = AugmentConfig::small(28);
        let (mut r1, mut r2) = (rng(5), rng(5));
        let a = sample_view(&cfg, View::A, 28, 28, &mut r1);
        assert!(a.erase.is_none());
        let on = AugmentConfig {
            erase_p: 1.0,
            ..cfg.clone()
        };
        let b = sample_view(&on, View::A, 28, 28, &mut r2);
        assert_eq!((a.crop, a.flip, a.solarize), (b.crop, b.flip, b.solarize));
        let mut r = rng(6);
        let mut erased = 0;
        for _ in 0..500 {
            let v = sample_view(&on, View::B, 28, 28, &mut r);
            let Some((bx, value)) = v.erase else { continue };
            erased += 1;
            assert!(
                bx.top + bx.height <= 28 && bx.left + bx.width <= 28,
                "{bx:?}"
            );
            let frac = (bx.height * bx.width) as f64 / 784.0;
            assert!((0.005..=0.3).contains(&frac), "{bx:?}");
            let mut img = vec![7u8; 3 * 784];
            apply_erase(&v, 28, &mut img);
            let filled = img.iter().filter(|&&p| p == value).count();
            let expect = 3 * bx.height * bx.width
                + if value == 7 {
                    3 * 784 - 3 * bx.height * bx.width
                } else {
                    0
                };
            assert_eq!(filled, expect);
        }
        assert!(erased > 450, "{erased} of 500 views erased at p = 1");
    }

    #[test]
    fn crop_boxes_respect_scale_and_ratio() {
        let cfg = AugmentConfig::default();
        let mut r = rng(1);
        for _ in 0..2000 {
            let b = sample_crop(&cfg, 200, 300, &mut r);
            assert!(b.top + b.height <= 200 && b.left + b.width <= 300);
            let frac = (b.height * b.width) as f64 / 60000.0;
            // Rounding to whole pixels moves the area/ratio slightly.
            assert!((0.07..=1.0).contains(&frac), "{b:?}");
            let ratio = b.width as f64 / b.height as f64;
            assert!((0.70..=1.45).contains(&ratio), "{b:?}");
        }
    }

    #[test]
    fn crop_fallback_is_central_and_clamped() {
        // min_scale 1 on a very wide image: no try fits, so the fallback crops height × 4/3·height.
        let cfg = AugmentConfig {
            min_scale: 1.0,
            ..AugmentConfig::default()
        };
        let b = sample_crop(&cfg, 30, 300, &mut rng(0));
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: 130,
                height: 30,
                width: 40
            }
        );
        let b = sample_crop(&cfg, 300, 30, &mut rng(0));
        assert_eq!(
            b,
            CropBox {
                top: 130,
                left: 0,
                height: 40,
                width: 30
            }
        );
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(3.4), 3.0);
    }

    #[test]
    fn view_sampling_follows_probabilities() {
        let cfg = AugmentConfig::default();
        let mut r = rng(3);
        let n = 4000;
        let (mut flip, mut jit, mut gray, mut blur_a, mut blur_b, mut sol_a, mut sol_b) =
            (0, 0, 0, 0, 0, 0, 0);
        for _ in 0..n {
            let a = sample_view(&cfg, View::A, 64, 64, &mut r);
            let b = sample_view(&cfg, View::B, 64, 64, &mut r);
            flip += a.flip as usize;
            jit += a.jitter.is_some() as usize;
            gray += b.grayscale as usize;
            blur_a += a.blur_sigma.is_some() as usize;
            blur_b += b.blur_sigma.is_some() as usize;
            sol_a += a.solarize as usize;
            sol_b += b.solarize as usize;
            if let Some(j) = a.jitter {
                let mut o = j.order;
                o.sort();
                assert_eq!(o, [0, 1, 2, 3]);
                assert!((0.6..=1.4).contains(&j.brightness) && (0.8..=1.2).contains(&j.saturation));
                assert!((-0.1..=0.1).contains(&j.hue));
            }
            if let Some(s) = b.blur_sigma {
                assert!((0.1..=2.0).contains(&s));
            }
        }
        let frac = |k: usize| k as f64 / n as f64;
        assert!((frac(flip) - 0.5).abs() < 0.04);
        assert!((frac(jit) - 0.8).abs() < 0.04);
        assert!((frac(gray) - 0.2).abs() < 0.04);
        assert_eq!(blur_a, n);
        assert!((frac(blur_b) - 0.1).abs() < 0.03);
        assert_eq!(sol_a, 0);
        assert!((frac(sol_b) - 0.2).abs() < 0.04);
        // Blur disabled by config.
        let small = AugmentConfig::small(32);
        assert!(sample_view(&small, View::A, 32, 32, &mut r)
            .blur_sigma
            .is_none());
    }

    #[test]
    fn config_validation_and_serde_defaults() {
        assert!(AugmentConfig::default().validate().is_ok());
        assert_eq!(AugmentConfig::default().blur_kernel_size(), 23);
        let c: AugmentConfig = serde_json::from_str(r#"{"crop_size": 32, "blur": false}"#).unwrap();
        assert_eq!(c, AugmentConfig::small(32));
        let bad = AugmentConfig {
            jitter_p: 1.5,
            ..AugmentConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("jitter_p"));
        assert!(serde_json::from_str::<AugmentConfig>(r#"{"crop": 3}"#).is_err());
    }
}
