//! The batched colour stage: colour jitter, grayscale, Gaussian blur, solarization and
//! normalization as tensor ops over a whole view batch on the training device (one kernel per op
//! on a GPU). Formulas follow torchvision's `transforms._functional_tensor` on float images in
//! [0, 1]; see `augment.rs` for where the pipeline differs from the official PIL one. On the CPU,
//! training uses the fused per-image version in `colour_cpu.rs` instead, checked against this one.

use tch::{Device, Kind, Tensor};

use super::augment::{AugmentConfig, ViewSample};
use crate::error::{Error, Result};

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
    use super::super::augment::{CropBox, Jitter, IMAGENET_MEAN, IMAGENET_STD};
    use super::*;
    use rand::{Rng, SeedableRng};

    fn batch(n: usize, s: usize) -> Tensor {
        let mut r = rand::rngs::StdRng::seed_from_u64(9);
        let v: Vec<u8> = (0..n * 3 * s * s).map(|_| r.gen()).collect();
        Tensor::from_slice(&v).view([n as i64, 3, s as i64, s as i64])
    }

    fn plain(crop: usize) -> ViewSample {
        ViewSample {
            crop: CropBox::whole(crop, crop),
            flip: false,
            jitter: None,
            grayscale: false,
            blur_sigma: None,
            solarize: false,
            erase: None,
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
}
