//! The two asymmetric Barlow Twins views (BYOL's augmentations; ../shared/design/BARLOW_TWINS.md).
//!
//! The work is split in two stages so that the expensive per-pixel colour operations run batched on
//! the training device while everything stays deterministic given the seed:
//!
//! 1. **Loader side (CPU, per sample)**: [`sample_view`] draws *all* random parameters of a view from
//!    the sample's RNG (crop box, flip, colour-jitter factors and order, grayscale, blur σ,
//!    solarization); [`resample_chw`] then crops, resizes (bicubic, antialiased like PIL) and flips
//!    the decoded image into u8 CHW.
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

use super::source::Image;
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
}

fn uniform<R: Rng>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

/// Python's `round` (half to even), as torchvision uses it for crop sizes.
fn round_half_even(x: f64) -> f64 {
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
    ViewSample {
        crop,
        flip,
        jitter,
        grayscale,
        blur_sigma,
        solarize,
    }
}

// ---------------------------------------------------------------------------------------------
// CPU resampling (PIL's separable, antialiased convolution resampler)
// ---------------------------------------------------------------------------------------------

/// Resampling filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Triangle filter, support 1 (torchvision's default for `Resize`).
    Bilinear,
    /// Keys cubic with a = −0.5, support 2 (PIL's and torch's antialiased bicubic).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Per-output-pixel source window and normalized weights along one axis (PIL `precompute_coeffs`)
/// for resizing the crop `[in0, in0 + in_len)` to `out_size`: output pixel `o` is centred at
/// `(o + 0.5)·scale` in crop coordinates; when downscaling the filter is stretched by `scale`
/// (antialiasing). As with torchvision's crop-then-resize, the window never reads outside the crop
/// (it is truncated and renormalized at the crop's edges); `start` is in image coordinates.
struct Coeffs {
    start: Vec<usize>,
    len: Vec<usize>,
    ksize: usize,
    w: Vec<f32>,
}

fn coeffs(in0: usize, in_len: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_len as f64 / out_size as f64;
    let fscale = scale.max(1.0);
    let support = filter.support() * fscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut c = Coeffs {
        start: Vec::with_capacity(out_size),
        len: Vec::with_capacity(out_size),
        ksize,
        w: vec![0.0; out_size * ksize],
    };
    let mut vals = vec![0f64; ksize];
    for o in 0..out_size {
        let center = (o as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
        let xmax = ((center + support + 0.5).trunc() as i64).min(in_len as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut total = 0.0;
        for (k, v) in vals.iter_mut().take(n).enumerate() {
            *v = filter.eval(((k + xmin) as f64 - center + 0.5) / fscale);
            total += *v;
        }
        let ws = &mut c.w[o * ksize..o * ksize + n];
        for (dst, v) in ws.iter_mut().zip(vals.iter()) {
            *dst = if total != 0.0 {
                (*v / total) as f32
            } else {
                0.0
            };
        }
        c.start.push(in0 + xmin);
        c.len.push(n);
    }
    c
}

avx2_dispatch! {
    /// Crops `bx` out of `img`, resizes it to `out_h × out_w` with `filter` (antialiased, like PIL's
    /// `Image.resize`), optionally mirrors it horizontally, and writes u8 **CHW** into `out`
    /// (`3 * out_h * out_w` bytes). Horizontal pass first, rounded and clipped to 8 bits as PIL does,
    /// then the vertical pass, rounded and clipped again.
    pub fn resample_chw(
        img: &Image,
        bx: CropBox,
        out_h: usize,
        out_w: usize,
        flip: bool,
        filter: Filter,
        out: &mut [u8],
    ) {
        debug_assert_eq!(out.len(), 3 * out_h * out_w);
        debug_assert!(bx.top + bx.height <= img.height && bx.left + bx.width <= img.width);
        let cx = coeffs(bx.left, bx.width, out_w, filter);
        let cy = coeffs(bx.top, bx.height, out_h, filter);
        // Source rows needed by the vertical pass.
        let y0 = cy.start.iter().copied().min().unwrap_or(0);
        let y1 = cy
            .start
            .iter()
            .zip(&cy.len)
            .map(|(s, l)| s + l)
            .max()
            .unwrap_or(0);
        let rows = y1 - y0;
        // Horizontal pass: rows × out_w × 3, interleaved.
        let mut tmp = vec![0f32; rows * out_w * 3];
        for r in 0..rows {
            let src = &img.data[(y0 + r) * img.width * 3..(y0 + r + 1) * img.width * 3];
            let dst = &mut tmp[r * out_w * 3..(r + 1) * out_w * 3];
            for x in 0..out_w {
                let (s, n) = (cx.start[x], cx.len[x]);
                let ws = &cx.w[x * cx.ksize..x * cx.ksize + n];
                let (mut a, mut b, mut c) = (0f32, 0f32, 0f32);
                for (k, &w) in ws.iter().enumerate() {
                    let p = (s + k) * 3;
                    a += w * src[p] as f32;
                    b += w * src[p + 1] as f32;
                    c += w * src[p + 2] as f32;
                }
                dst[x * 3] = a;
                dst[x * 3 + 1] = b;
                dst[x * 3 + 2] = c;
            }
            // Like PIL (and torch's uint8 path), the intermediate is an 8-bit image: rounding and
            // clipping here keeps bicubic overshoot from reaching the vertical pass.
            for v in dst.iter_mut() {
                *v = round_clamp_u8(*v);
            }
        }
        // Vertical pass into CHW.
        let plane = out_h * out_w;
        let mut acc = vec![0f32; out_w * 3];
        for y in 0..out_h {
            let (s, n) = (cy.start[y] - y0, cy.len[y]);
            let ws = &cy.w[y * cy.ksize..y * cy.ksize + n];
            acc.iter_mut().for_each(|v| *v = 0.0);
            for (k, &w) in ws.iter().enumerate() {
                let row = &tmp[(s + k) * out_w * 3..(s + k + 1) * out_w * 3];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += w * v;
                }
            }
            for v in acc.iter_mut() {
                *v = round_clamp_u8(*v);
            }
            for x in 0..out_w {
                let ox = if flip { out_w - 1 - x } else { x };
                for ch in 0..3 {
                    out[ch * plane + y * out_w + ox] = acc[x * 3 + ch] as u8;
                }
            }
        }
    }
}

/// `x.round().clamp(0, 255)` (half away from zero, as `f32::round`) without the libm call, so
/// that loops over it vectorize: after clamping, `trunc` is an integer conversion and the
/// fraction `x − trunc(x)` is exact.
#[inline(always)]
fn round_clamp_u8(x: f32) -> f32 {
    let x = x.clamp(0.0, 255.0);
    let t = x as i32 as f32;
    if x - t >= 0.5 {
        t + 1.0
    } else {
        t
    }
}

/// Resizes `img` so that its shorter side is `resize` (torchvision `Resize(int)`, bilinear,
/// antialiased), then takes the central `crop × crop` (torchvision `CenterCrop`); writes u8 CHW.
pub fn resize_center_crop_chw(img: &Image, resize: usize, crop: usize, out: &mut [u8]) {
    let (h, w) = (img.height, img.width);
    let (rh, rw) = if w <= h {
        (((resize * h) as f64 / w as f64) as usize, resize)
    } else {
        (resize, ((resize * w) as f64 / h as f64) as usize)
    };
    let (rh, rw) = (rh.max(crop), rw.max(crop));
    let mut full = vec![0u8; 3 * rh * rw];
    let bx = CropBox {
        top: 0,
        left: 0,
        height: h,
        width: w,
    };
    resample_chw(img, bx, rh, rw, false, Filter::Bilinear, &mut full);
    let top = round_half_even((rh - crop) as f64 / 2.0) as usize;
    let left = round_half_even((rw - crop) as f64 / 2.0) as usize;
    for ch in 0..3 {
        for y in 0..crop {
            let src = ch * rh * rw + (top + y) * rw + left;
            let dst = ch * crop * crop + y * crop;
            out[dst..dst + crop].copy_from_slice(&full[src..src + crop]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    #[test]
    fn fast_rounding_is_f32_round() {
        let mut x = -3.0f32;
        while x < 260.0 {
            for v in [
                x,
                x + 0.5,
                x.next_up(),
                (x + 0.5).next_down(),
                (x + 0.5).next_up(),
            ] {
                assert_eq!(round_clamp_u8(v), v.round().clamp(0.0, 255.0), "{v}");
            }
            x += 0.25;
        }
        assert_eq!(
            round_clamp_u8(f32::NAN) as u8,
            f32::NAN.round().clamp(0.0, 255.0) as u8
        );
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

    fn ramp(h: usize, w: usize) -> Image {
        let mut d = Vec::new();
        for y in 0..h {
            for x in 0..w {
                d.extend_from_slice(&[(x * 10) as u8, (y * 10) as u8, 77]);
            }
        }
        Image::from_rgb(h, w, d).unwrap()
    }

    #[test]
    fn resample_identity_crop_and_flip() {
        let img = ramp(6, 8);
        let bx = CropBox {
            top: 1,
            left: 2,
            height: 4,
            width: 5,
        };
        let mut out = vec![0u8; 3 * 4 * 5];
        resample_chw(&img, bx, 4, 5, false, Filter::Bicubic, &mut out);
        for y in 0..4 {
            for x in 0..5 {
                let p = img.pixel(y + 1, x + 2);
                for c in 0..3 {
                    assert_eq!(out[c * 20 + y * 5 + x], p[c]);
                }
            }
        }
        let mut flipped = vec![0u8; 60];
        resample_chw(&img, bx, 4, 5, true, Filter::Bicubic, &mut flipped);
        for c in 0..3 {
            for y in 0..4 {
                for x in 0..5 {
                    assert_eq!(flipped[c * 20 + y * 5 + x], out[c * 20 + y * 5 + 4 - x]);
                }
            }
        }
    }

    #[test]
    fn resample_downscale_averages_and_constant_stays_constant() {
        let img = Image::from_rgb(16, 16, vec![90; 16 * 16 * 3]).unwrap();
        let full = CropBox {
            top: 0,
            left: 0,
            height: 16,
            width: 16,
        };
        let mut out = vec![0u8; 3 * 5 * 7];
        resample_chw(&img, full, 5, 7, false, Filter::Bicubic, &mut out);
        assert!(out.iter().all(|&v| v == 90));
        // A 2x box-downscale of a linear ramp (bilinear filter, antialiased) gives pair means.
        let img = ramp(4, 8);
        let bx = CropBox {
            top: 0,
            left: 0,
            height: 4,
            width: 8,
        };
        let mut out = vec![0u8; 3 * 4 * 4];
        resample_chw(&img, bx, 4, 4, false, Filter::Bilinear, &mut out);
        // Interior pixels of a linear ramp keep linearity: (x*10) averaged around 2x+0.5.
        assert_eq!(out[1], 25);
        assert_eq!(out[2], 45);
    }

    #[test]
    fn center_crop_matches_torchvision_geometry() {
        let img = ramp(10, 14);
        let mut out = vec![0u8; 3 * 8 * 8];
        // Shorter side already 10: no scaling; crop 8 at top=round(1.0)=1, left=round(3.0)=3.
        resize_center_crop_chw(&img, 10, 8, &mut out);
        assert_eq!(out[0], img.pixel(1, 3)[0]);
        assert_eq!(out[64], img.pixel(1, 3)[1]);
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
