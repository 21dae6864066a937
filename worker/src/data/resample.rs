//! CPU resampling: PIL's separable, antialiased convolution resampler, used for the views' crop,
//! resize and flip on the loader threads and for the evaluation transform's resize.

use super::augment::{round_half_even, CropBox};
use super::source::Image;

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
    resample_chw(
        img,
        CropBox::whole(h, w),
        rh,
        rw,
        false,
        Filter::Bilinear,
        &mut full,
    );
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
        let mut out = vec![0u8; 3 * 5 * 7];
        resample_chw(
            &img,
            CropBox::whole(16, 16),
            5,
            7,
            false,
            Filter::Bicubic,
            &mut out,
        );
        assert!(out.iter().all(|&v| v == 90));
        // A 2x box-downscale of a linear ramp (bilinear filter, antialiased) gives pair means.
        let img = ramp(4, 8);
        let mut out = vec![0u8; 3 * 4 * 4];
        resample_chw(
            &img,
            CropBox::whole(4, 8),
            4,
            4,
            false,
            Filter::Bilinear,
            &mut out,
        );
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
}
