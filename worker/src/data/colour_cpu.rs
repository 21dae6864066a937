//! The colour stage fused into one pass per image, for training on the CPU.
//!
//! [`device_stage`](super::colour_device::device_stage) runs colour jitter, grayscale, blur, solarization
//! and normalization as batched tensor ops, which suits a GPU: there each op is one kernel over the
//! batch. On the CPU the same ops cost a full sweep of memory each and, for the per-sample
//! subsets, gathers and scatters besides; [`colour_view`] instead finishes one image at a time
//! while it is still in cache, on the loader's worker threads, so the training step receives
//! finished f32 views (`LoaderConfig::colour_on_cpu`).
//!
//! The arithmetic is the device stage's, operation for operation (torchvision's formulas, see
//! `augment.rs`); results agree with it to float rounding (a few 1e-6 after normalization: the
//! contrast mean is summed in a different order, and Gaussian taps below 1e-12 are skipped, which
//! also keeps subnormal products out of the blur).
//!
//! Hot loops are written over plain slices so that they vectorize; on x86-64 with AVX2 the same
//! code is compiled a second time for AVX2 and picked at run time.

use super::augment::{AugmentConfig, Jitter, ViewSample};

const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];
/// Gaussian taps below this weight are skipped (their contribution is below float resolution).
const MIN_TAP: f32 = 1e-12;

/// Reusable per-thread buffers of [`colour_view`].
#[derive(Default)]
pub struct ColourScratch {
    plane: Vec<f32>,
    row: Vec<f32>,
}

avx2_dispatch! {
    /// Finishes one view: `src` is u8 CHW `[3, side, side]` after crop/resize/flip, `out` receives
    /// the normalized f32 CHW image, with `s`'s colour jitter, grayscale, blur and solarization
    /// applied in the device stage's order.
    pub fn colour_view(
        cfg: &AugmentConfig,
        s: &ViewSample,
        src: &[u8],
        side: usize,
        out: &mut [f32],
        scratch: &mut ColourScratch,
    ) {
        let n = side * side;
        assert!(
            src.len() == 3 * n && out.len() == 3 * n,
            "colour_view: buffers of {} and {} values for a 3x{side}x{side} view",
            src.len(),
            out.len()
        );
        for (o, &v) in out.iter_mut().zip(src) {
            *o = v as f32 / 255.0;
        }
        {
            let (r, rest) = out.split_at_mut(n);
            let (g, b) = rest.split_at_mut(n);
            if let Some(j) = &s.jitter {
                jitter(j, r, g, b);
            }
            if s.grayscale {
                for i in 0..n {
                    let l = luma(r[i], g[i], b[i]);
                    r[i] = l;
                    g[i] = l;
                    b[i] = l;
                }
            }
        }
        if let Some(sigma) = s.blur_sigma {
            let taps = gaussian_taps(sigma, cfg.blur_kernel_size());
            for plane in out.chunks_exact_mut(n) {
                blur_plane(plane, side, &taps, scratch);
            }
        }
        if s.solarize {
            let t = 128.0f32 / 255.0;
            for v in out.iter_mut() {
                *v = if *v >= t { 1.0 - *v } else { *v };
            }
        }
        for (c, plane) in out.chunks_exact_mut(n).enumerate() {
            let (m, sd) = (cfg.mean[c], cfg.std[c]);
            for v in plane.iter_mut() {
                *v = (*v - m) / sd;
            }
        }
    }
}

#[inline(always)]
fn luma(r: f32, g: f32, b: f32) -> f32 {
    r * LUMA[0] + g * LUMA[1] + b * LUMA[2]
}

/// torchvision `_blend(x, other, f)`: `x·f + other·(1 − f)`, clamped to [0, 1].
#[inline(always)]
fn blend(x: f32, other: f32, f: f32, one_minus_f: f32) -> f32 {
    (x * f + other * one_minus_f).clamp(0.0, 1.0)
}

#[inline(always)]
fn jitter(j: &Jitter, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    let n = r.len();
    for &op in &j.order {
        match op {
            0 => {
                let f = j.brightness;
                for p in [&mut *r, &mut *g, &mut *b] {
                    for v in p.iter_mut() {
                        *v = (*v * f).clamp(0.0, 1.0);
                    }
                }
            }
            1 => {
                let (f, h) = (j.contrast, 1.0 - j.contrast);
                let sum: f64 = (0..n).map(|i| luma(r[i], g[i], b[i]) as f64).sum();
                let mean = (sum / n as f64) as f32;
                for p in [&mut *r, &mut *g, &mut *b] {
                    for v in p.iter_mut() {
                        *v = blend(*v, mean, f, h);
                    }
                }
            }
            2 => {
                let (f, h) = (j.saturation, 1.0 - j.saturation);
                for i in 0..n {
                    let l = luma(r[i], g[i], b[i]);
                    r[i] = blend(r[i], l, f, h);
                    g[i] = blend(g[i], l, f, h);
                    b[i] = blend(b[i], l, f, h);
                }
            }
            _ => {
                let shift = j.hue;
                for i in 0..n {
                    let [nr, ng, nb] = hue_shift(r[i], g[i], b[i], shift);
                    r[i] = nr;
                    g[i] = ng;
                    b[i] = nb;
                }
            }
        }
    }
}

/// `x mod 1` for `x` in [−1, 2) (torch `remainder(x, 1)`), without a call to `floor`.
#[inline(always)]
fn wrap_unit(x: f32) -> f32 {
    if x < 0.0 {
        x + 1.0
    } else if x >= 1.0 {
        x - 1.0
    } else {
        x
    }
}

/// torchvision `adjust_hue` on one pixel: RGB → HSV (`_rgb2hsv`), hue + `shift` mod 1, HSV → RGB
/// in the closed form the device stage uses. Branch-free so the pixel loop vectorizes.
#[inline(always)]
fn hue_shift(r: f32, g: f32, b: f32, shift: f32) -> [f32; 3] {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let cr_div = if eqc { 1.0 } else { cr };
    let rc = (maxc - r) / cr_div;
    let gc = (maxc - g) / cr_div;
    let bc = (maxc - b) / cr_div;
    let hr = bc - gc;
    let hg = (rc - bc) + 2.0;
    let hb = (gc - rc) + 4.0;
    let h = if maxc == r {
        hr
    } else if maxc == g {
        hg
    } else {
        hb
    };
    // (h/6 + 1) mod 1, then the shift mod 1: both arguments lie in [−1, 2).
    let h = wrap_unit(wrap_unit(h / 6.0 + 1.0) + shift);
    let v = maxc;
    let vs = v * s;
    let h6 = h * 6.0;
    let channel = |m: f32| {
        let k = h6 + m;
        let k = if k >= 6.0 { k - 6.0 } else { k };
        let w = k.min(4.0 - k).clamp(0.0, 1.0);
        v - vs * w
    };
    [channel(5.0), channel(3.0), channel(1.0)]
}

/// Normalized Gaussian weights of odd size `ksize` (torchvision `_get_gaussian_kernel1d`), with
/// the negligible outer taps dropped: `(offset from the centre, weight)` pairs.
fn gaussian_taps(sigma: f32, ksize: usize) -> Vec<(isize, f32)> {
    let half = (ksize as f64 - 1.0) * 0.5;
    let step = if ksize > 1 {
        2.0 * half / (ksize as f64 - 1.0)
    } else {
        0.0
    };
    let pdf: Vec<f32> = (0..ksize)
        .map(|i| {
            let x = (-half + step * i as f64) as f32;
            (-0.5 * (x / sigma).powi(2)).exp()
        })
        .collect();
    let sum: f32 = pdf.iter().sum();
    let c = (ksize / 2) as isize;
    pdf.iter()
        .enumerate()
        .map(|(i, &p)| (i as isize - c, p / sum))
        .filter(|&(_, w)| w >= MIN_TAP)
        .collect()
}

/// Reflect-padded index (PyTorch `reflection_pad`): −1 → 1, len → len − 2.
#[inline(always)]
fn reflect(i: isize, len: usize) -> usize {
    let last = len as isize - 1;
    let i = if i < 0 { -i } else { i };
    (if i > last { 2 * last - i } else { i }) as usize
}

/// Separable blur of one `side`×`side` plane in place: along rows, then along columns.
#[inline(always)]
fn blur_plane(plane: &mut [f32], side: usize, taps: &[(isize, f32)], scratch: &mut ColourScratch) {
    let pad = taps.iter().map(|t| t.0.unsigned_abs()).max().unwrap_or(0);
    let ColourScratch { plane: tmp, row } = scratch;
    tmp.clear();
    tmp.resize(side * side, 0.0);
    row.clear();
    row.resize(side + 2 * pad, 0.0);
    // Horizontal pass into `tmp`.
    for (src, dst) in plane.chunks_exact(side).zip(tmp.chunks_exact_mut(side)) {
        for (k, v) in row.iter_mut().enumerate() {
            *v = src[reflect(k as isize - pad as isize, side)];
        }
        for &(off, w) in taps {
            let start = (pad as isize + off) as usize;
            for (d, &x) in dst.iter_mut().zip(&row[start..start + side]) {
                *d += w * x;
            }
        }
    }
    // Vertical pass back into `plane`.
    for (y, dst) in plane.chunks_exact_mut(side).enumerate() {
        dst.fill(0.0);
        for &(off, w) in taps {
            let sy = reflect(y as isize + off, side);
            for (d, &x) in dst.iter_mut().zip(&tmp[sy * side..(sy + 1) * side]) {
                *d += w * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::augment::{sample_view, View};
    use super::super::colour_device::device_stage;
    use super::*;
    use rand::{Rng, SeedableRng};
    use tch::Tensor;

    /// The fused stage against the batched tensor stage on random images and random parameters
    /// (every op appears: jitter in all orders, grayscale, blur with small and large σ, solarize).
    #[test]
    fn matches_the_tensor_stage() {
        for (cfg, side) in [
            (AugmentConfig::imagenet(), 40usize),
            (AugmentConfig::small(28), 28),
        ] {
            let mut cfg = cfg;
            cfg.crop_size = side;
            cfg.solarize_p = [0.5, 0.5];
            if cfg.blur {
                cfg.blur_p = [0.7, 0.7];
                cfg.blur_kernel = Some(9);
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let n = 24;
            let samples: Vec<ViewSample> = (0..n)
                .map(|i| {
                    let v = if i % 2 == 0 { View::A } else { View::B };
                    sample_view(&cfg, v, side, side, &mut rng)
                })
                .collect();
            let pixels: Vec<u8> = (0..n * 3 * side * side)
                .map(|i| {
                    // Smooth structure plus noise, with a few saturated and flat regions.
                    let base = ((i / 7) % 256) as i32;
                    (base + rng.gen_range(-20..20)).clamp(0, 255) as u8
                })
                .collect();
            let t = Tensor::from_slice(&pixels).view([n as i64, 3, side as i64, side as i64]);
            let want = device_stage(&cfg, &t, &samples).unwrap();
            let want: Vec<f32> = Vec::try_from(want.flatten(0, -1)).unwrap();
            let per = 3 * side * side;
            let mut got = vec![0f32; n * per];
            let mut scratch = ColourScratch::default();
            for i in 0..n {
                colour_view(
                    &cfg,
                    &samples[i],
                    &pixels[i * per..(i + 1) * per],
                    side,
                    &mut got[i * per..(i + 1) * per],
                    &mut scratch,
                );
            }
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 2e-5, "side {side}: max abs difference {worst}");
            assert!(samples.iter().any(|s| s.jitter.is_some()));
            assert!(samples.iter().any(|s| s.grayscale));
            assert!(samples.iter().any(|s| s.solarize));
        }
    }

    #[test]
    fn hue_shift_round_trips_and_wraps() {
        for &(r, g, b) in &[
            (0.2f32, 0.5, 0.9),
            (0.9, 0.1, 0.1),
            (0.3, 0.3, 0.3),
            (0.0, 1.0, 0.5),
        ] {
            let [nr, ng, nb] = hue_shift(r, g, b, 0.0);
            assert!((nr - r).abs() < 1e-6 && (ng - g).abs() < 1e-6 && (nb - b).abs() < 1e-6);
            // A full turn in two halves is the identity too.
            let [x, y, z] = hue_shift(r, g, b, 0.5);
            let [x, y, z] = hue_shift(x, y, z, 0.5);
            assert!((x - r).abs() < 1e-5 && (y - g).abs() < 1e-5 && (z - b).abs() < 1e-5);
        }
    }

    #[test]
    fn blur_keeps_constants_and_taps_sum_to_one() {
        for sigma in [0.1f32, 0.5, 2.0] {
            let taps = gaussian_taps(sigma, 23);
            let sum: f32 = taps.iter().map(|t| t.1).sum();
            assert!((sum - 1.0).abs() < 1e-5, "σ {sigma}: {sum}");
        }
        let mut plane = vec![0.25f32; 16 * 16];
        blur_plane(
            &mut plane,
            16,
            &gaussian_taps(1.5, 9),
            &mut ColourScratch::default(),
        );
        assert!(plane.iter().all(|v| (v - 0.25).abs() < 1e-6));
    }
}
