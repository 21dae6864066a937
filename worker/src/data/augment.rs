//! The two asymmetric Barlow Twins views (BYOL's augmentations; ../shared/design/BARLOW_TWINS.md).
//!
//! The work is split in two stages so that the expensive per-pixel colour operations run batched on
//! the training device while everything stays deterministic given the seed:
//!
//! 1. **Loader side (CPU, per sample)**: [`sample_view`] draws *all* random parameters of a view from
//!    the sample's RNG (crop box, flip, colour-jitter factors and order, grayscale, blur σ,
//!    solarization); [`resample_chw`] then crops, resizes (bicubic, antialiased like PIL) and flips
//!    the decoded image into u8 CHW.
//! 2. **Device side (batched)**: [`device_stage`] applies colour jitter, grayscale, Gaussian blur and
//!    solarization with the per-sample parameters, then normalizes; float32, NCHW.
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
use tch::{Device, Kind, Tensor};

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

// ---------------------------------------------------------------------------------------------
// Device stage (batched tensor ops)
// ---------------------------------------------------------------------------------------------

/// ITU-R 601-2 luma as torchvision's `rgb_to_grayscale`: [n,3,H,W] → [n,1,H,W].
fn luma(x: &Tensor) -> Tensor {
    let c = x.unbind(1);
    (&c[0] * 0.2989 + &c[1] * 0.587 + &c[2] * 0.114).unsqueeze(1)
}

/// torchvision `_blend`: `ratio·a + (1 − ratio)·b`, clamped to [0, 1]; `ratio` is [n,1,1,1].
fn blend(a: &Tensor, b: &Tensor, ratio: &Tensor) -> Tensor {
    (a * ratio + b * (ratio.ones_like() - ratio)).clamp(0.0, 1.0)
}

/// torchvision `_rgb2hsv` on [n,3,H,W] in [0,1].
fn rgb_to_hsv(x: &Tensor) -> Tensor {
    let c = x.unbind(1);
    let (r, g, b) = (&c[0], &c[1], &c[2]);
    let maxc = x.amax([1i64].as_slice(), false);
    let minc = x.amin([1i64].as_slice(), false);
    let eqc = maxc.eq_tensor(&minc);
    let cr = &maxc - &minc;
    let ones = maxc.ones_like();
    let s = &cr / ones.where_self(&eqc, &maxc);
    let cr_div = ones.where_self(&eqc, &cr);
    let rc = (&maxc - r) / &cr_div;
    let gc = (&maxc - g) / &cr_div;
    let bc = (&maxc - b) / &cr_div;
    let is_r = maxc.eq_tensor(r);
    let is_g = maxc.eq_tensor(g);
    let hr = is_r.to_kind(Kind::Float) * (&bc - &gc);
    let hg = is_g.logical_and(&is_r.logical_not()).to_kind(Kind::Float) * ((&rc - &bc) + 2.0);
    let hb = is_g
        .logical_not()
        .logical_and(&is_r.logical_not())
        .to_kind(Kind::Float)
        * ((&gc - &rc) + 4.0);
    let h = ((hr + hg + hb) / 6.0 + 1.0).fmod(1.0);
    Tensor::stack(&[h, s, maxc], 1)
}

/// HSV → RGB on [n,3,H,W]. Same function as torchvision's `_hsv2rgb` (sector table), written in
/// the closed form `c_m = v − v·s·clamp(min(k, 4 − k), 0, 1)` with `k = (m + 6h) mod 6` and
/// m = 5, 3, 1 for R, G, B, which takes a third of the tensor operations.
fn hsv_to_rgb(x: &Tensor) -> Tensor {
    let c = x.unbind(1);
    let (h, s, v) = (c[0].unsqueeze(1), c[1].unsqueeze(1), c[2].unsqueeze(1));
    let m = Tensor::from_slice(&[5f32, 3.0, 1.0])
        .to_device(x.device())
        .view([1, 3, 1, 1]);
    let k = (h * 6.0 + m).remainder(6.0);
    let w = k.minimum(&(k.ones_like() * 4.0 - &k)).clamp(0.0, 1.0);
    &v - &v * s * w
}

/// torchvision `adjust_hue` with a per-sample shift `hue` of shape [n,1,1].
fn adjust_hue(x: &Tensor, hue: &Tensor) -> Tensor {
    let hsv = rgb_to_hsv(x).unbind(1);
    let h = (&hsv[0] + hue).remainder(1.0);
    hsv_to_rgb(&Tensor::stack(&[&h, &hsv[1], &hsv[2]], 1))
}

/// Applies `f` to the samples `idx` of `x` (in place), leaving the others untouched.
fn apply_subset(x: &mut Tensor, idx: &[i64], f: impl FnOnce(&Tensor, &Tensor) -> Tensor) {
    if idx.is_empty() {
        return;
    }
    let device = x.device();
    let it = Tensor::from_slice(idx).to_device(device);
    let sub = x.index_select(0, &it);
    let res = f(&sub, &it);
    let _ = x.index_copy_(0, &it, &res);
}

fn per_sample(vals: &[f32], device: Device, shape: &[i64]) -> Tensor {
    Tensor::from_slice(vals).to_device(device).view(shape)
}

/// Normalized 1-D Gaussian kernels, one row per σ (torchvision `_get_gaussian_kernel1d`).
fn gaussian_kernels(sigmas: &[f32], ksize: usize, device: Device) -> Tensor {
    let half = (ksize as f64 - 1.0) * 0.5;
    let x = Tensor::linspace(-half, half, ksize as i64, (Kind::Float, device)).view([1, -1]);
    let s = per_sample(sigmas, device, &[-1, 1]);
    let pdf = ((&x / &s).pow_tensor_scalar(2) * -0.5).exp();
    let sum = pdf.sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
    pdf / sum
}

/// Per-sample Gaussian blur of [n,3,H,W] with reflect padding, as a separable grouped convolution.
fn gaussian_blur(x: &Tensor, sigmas: &[f32], ksize: usize) -> Tensor {
    let (n, c, h, w) = x.size4().expect("4-d image batch");
    let k = gaussian_kernels(sigmas, ksize, x.device()); // [n, ks]
    let k = k
        .unsqueeze(1)
        .expand([n, c, ksize as i64], false)
        .reshape([n * c, 1, 1, ksize as i64]);
    let pad = (ksize / 2) as i64;
    let y = x
        .reshape([1, n * c, h, w])
        .reflection_pad2d([pad, pad, pad, pad]);
    let y = y.conv2d(&k, None::<Tensor>, [1, 1], [0, 0], [1, 1], n * c);
    let y = y.conv2d(
        &k.transpose(2, 3),
        None::<Tensor>,
        [1, 1],
        [0, 0],
        [1, 1],
        n * c,
    );
    y.reshape([n, c, h, w])
}

/// The batched device stage of one view: u8 [n,3,S,S] (any device) → normalized f32 [n,3,S,S] on
/// the same device. `samples[i]` holds sample i's parameters (its crop/flip were applied on the CPU).
///
/// Per sample, in order: colour jitter (the four ops in the sample's own random order), grayscale,
/// Gaussian blur, solarization, then normalization. A sample without a given op is left exactly
/// unchanged by it.
pub fn device_stage(
    cfg: &AugmentConfig,
    images: &Tensor,
    samples: &[ViewSample],
) -> Result<Tensor> {
    let size = images.size();
    if size.len() != 4 || size[1] != 3 || size[0] != samples.len() as i64 {
        return Err(Error::Other(format!(
            "device_stage: images of shape {size:?} for {} samples; expected [n,3,H,W]",
            samples.len()
        )));
    }
    let device = images.device();
    let mut x = images.f_to_kind(Kind::Float)? / 255.0;

    // Colour jitter: in slot k, every sample whose k-th op is `op` gets `op` with its own factor.
    for slot in 0..4 {
        for op in 0u8..4 {
            let mut idx = Vec::new();
            let mut fac = Vec::new();
            for (i, s) in samples.iter().enumerate() {
                if let Some(j) = &s.jitter {
                    if j.order[slot] == op {
                        idx.push(i as i64);
                        fac.push(match op {
                            0 => j.brightness,
                            1 => j.contrast,
                            2 => j.saturation,
                            _ => j.hue,
                        });
                    }
                }
            }
            apply_subset(&mut x, &idx, |sub, _| match op {
                0 => {
                    let f = per_sample(&fac, device, &[-1, 1, 1, 1]);
                    blend(sub, &sub.zeros_like(), &f)
                }
                1 => {
                    let f = per_sample(&fac, device, &[-1, 1, 1, 1]);
                    let mean = luma(sub).mean_dim([1i64, 2, 3].as_slice(), true, Kind::Float);
                    blend(sub, &mean, &f)
                }
                2 => {
                    let f = per_sample(&fac, device, &[-1, 1, 1, 1]);
                    blend(sub, &luma(sub), &f)
                }
                _ => adjust_hue(sub, &per_sample(&fac, device, &[-1, 1, 1])),
            });
        }
    }

    let gray: Vec<i64> = (0..samples.len() as i64)
        .filter(|&i| samples[i as usize].grayscale)
        .collect();
    apply_subset(&mut x, &gray, |sub, _| {
        luma(sub).expand([-1, 3, -1, -1], false)
    });

    let (blur_idx, sigmas): (Vec<i64>, Vec<f32>) = samples
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.blur_sigma.map(|sg| (i as i64, sg)))
        .unzip();
    if !blur_idx.is_empty() {
        let k = cfg.blur_kernel_size();
        if k / 2 >= size[2].min(size[3]) as usize {
            return Err(Error::Config(format!(
                "augment.blur_kernel: {k} too large for {}x{} views",
                size[2], size[3]
            )));
        }
        apply_subset(&mut x, &blur_idx, |sub, _| gaussian_blur(sub, &sigmas, k));
    }

    let sol: Vec<i64> = (0..samples.len() as i64)
        .filter(|&i| samples[i as usize].solarize)
        .collect();
    apply_subset(&mut x, &sol, |sub, _| {
        let inv = sub.ones_like() - sub;
        inv.where_self(&sub.ge(128.0 / 255.0), sub)
    });

    let mean = Tensor::from_slice(&cfg.mean)
        .to_device(device)
        .view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&cfg.std)
        .to_device(device)
        .view([1, 3, 1, 1]);
    Ok((x - mean) / std)
}

/// Normalization only (evaluation): u8 [n,3,H,W] → f32 `(x/255 − mean)/std`.
pub fn normalize(images: &Tensor, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
    let device = images.device();
    let x = images.f_to_kind(Kind::Float)? / 255.0;
    let mean = Tensor::from_slice(&mean)
        .to_device(device)
        .view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&std)
        .to_device(device)
        .view([1, 3, 1, 1]);
    Ok((x - mean) / std)
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

    fn batch(n: usize, s: usize) -> Tensor {
        let mut r = rng(9);
        let v: Vec<u8> = (0..n * 3 * s * s).map(|_| r.gen()).collect();
        Tensor::from_slice(&v).view([n as i64, 3, s as i64, s as i64])
    }

    fn plain(crop: usize) -> ViewSample {
        ViewSample {
            crop: CropBox {
                top: 0,
                left: 0,
                height: crop,
                width: crop,
            },
            flip: false,
            jitter: None,
            grayscale: false,
            blur_sigma: None,
            solarize: false,
        }
    }

    #[test]
    fn device_stage_identity_is_normalize() {
        let cfg = AugmentConfig::small(8);
        let x = batch(3, 8);
        let y = device_stage(&cfg, &x, &[plain(8); 3]).unwrap();
        let z = normalize(&x, IMAGENET_MEAN, IMAGENET_STD).unwrap();
        assert_eq!(y.size(), vec![3, 3, 8, 8]);
        assert!(f64::try_from((y - z).abs().max()).unwrap() < 1e-6);
    }

    #[test]
    fn device_stage_ops_match_formulas() {
        let cfg = AugmentConfig {
            mean: [0.0; 3],
            std: [1.0; 3],
            ..AugmentConfig::small(8)
        };
        let x = batch(4, 8);
        let xf = x.to_kind(Kind::Float) / 255.0;
        let mut s = [plain(8); 4];
        // 0: brightness 0.5 only (other factors identity); 1: grayscale; 2: solarize; 3: none.
        s[0].jitter = Some(Jitter {
            order: [2, 0, 3, 1],
            brightness: 0.5,
            contrast: 1.0,
            saturation: 1.0,
            hue: 0.0,
        });
        s[1].grayscale = true;
        s[2].solarize = true;
        let y = device_stage(&cfg, &x, &s).unwrap();
        let d = |a: &Tensor, b: &Tensor| f64::try_from((a - b).abs().max()).unwrap();
        assert!(d(&y.get(0), &(xf.get(0) * 0.5)) < 1e-5);
        let g = xf.get(1).unbind(0);
        let l = &g[0] * 0.2989 + &g[1] * 0.587 + &g[2] * 0.114;
        for c in 0..3 {
            assert!(d(&y.get(1).get(c), &l) < 1e-5);
        }
        let x2 = xf.get(2);
        let sol = (x2.ones_like() - &x2).where_self(&x2.ge(128.0 / 255.0), &x2);
        assert!(d(&y.get(2), &sol) < 1e-6);
        assert!(d(&y.get(3), &xf.get(3)) < 1e-6);
    }

    #[test]
    fn hsv_round_trip_and_hue_shift() {
        let x = batch(2, 6).to_kind(Kind::Float) / 255.0;
        let back = hsv_to_rgb(&rgb_to_hsv(&x));
        assert!(f64::try_from((&back - &x).abs().max()).unwrap() < 1e-5);
        // A full-turn hue shift of pure red by 1/3 gives pure green.
        let red = Tensor::from_slice(&[1f32, 0.0, 0.0]).view([1, 3, 1, 1]);
        let g = adjust_hue(&red, &Tensor::from_slice(&[1.0f32 / 3.0]).view([1, 1, 1]));
        let v: Vec<f32> = Vec::try_from(g.flatten(0, -1)).unwrap();
        assert!((v[0] - 0.0).abs() < 1e-5 && (v[1] - 1.0).abs() < 1e-5 && v[2].abs() < 1e-5);
    }

    #[test]
    fn blur_keeps_constants_and_smooths() {
        let c = Tensor::full([2, 3, 12, 12], 0.3, (Kind::Float, Device::Cpu));
        let y = gaussian_blur(&c, &[0.5, 2.0], 5);
        assert!(f64::try_from((y - 0.3).abs().max()).unwrap() < 1e-6);
        let x = batch(1, 12).to_kind(Kind::Float);
        let y = gaussian_blur(&x, &[2.0], 5);
        let var = |t: &Tensor| f64::try_from(t.var(true)).unwrap();
        assert!(var(&y) < 0.5 * var(&x));
        let k = gaussian_kernels(&[1.0], 5, Device::Cpu);
        let v: Vec<f32> = Vec::try_from(k.flatten(0, -1)).unwrap();
        // exp(-2), exp(-0.5), 1, ... normalized.
        let z = 1.0 + 2.0 * (-0.5f32).exp() + 2.0 * (-2.0f32).exp();
        assert!((v[2] - 1.0 / z).abs() < 1e-6 && (v[0] - (-2.0f32).exp() / z).abs() < 1e-6);
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
