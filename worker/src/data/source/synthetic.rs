//! Deterministic generated images with labels, for tests and benchmarks.

use std::path::PathBuf;

use super::{Image, Source};
use crate::error::{Error, Result};

/// SplitMix64 finalizer: a cheap, well-mixed hash used to derive seeds.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Deterministic generated images: item `i` depends only on (seed, i). Each class has its own base
/// colour and stripe orientation/frequency, plus per-item noise and phase, so classes are learnable
/// but items differ.
pub struct SyntheticSource {
    len: usize,
    height: usize,
    width: usize,
    num_classes: usize,
    seed: u64,
    fail_every: usize,
}

impl SyntheticSource {
    pub fn new(
        len: usize,
        height: usize,
        width: usize,
        num_classes: usize,
        seed: u64,
    ) -> Result<Self> {
        if height == 0 || width == 0 || num_classes == 0 {
            return Err(Error::Config(format!(
                "synthetic source needs a positive size and class count, got {height}x{width}, \
                 {num_classes} classes"
            )));
        }
        Ok(SyntheticSource {
            len,
            height,
            width,
            num_classes,
            seed,
            fail_every: 0,
        })
    }

    /// Makes every item `i` with `i % n == n - 1` fail to decode (0 = never); for tests.
    pub fn with_fail_every(mut self, n: usize) -> Self {
        self.fail_every = n;
        self
    }

    fn class_of(&self, i: usize) -> usize {
        (mix64(self.seed ^ mix64(i as u64)) % self.num_classes as u64) as usize
    }
}

impl Source for SyntheticSource {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, i: usize) -> Result<Image> {
        if i >= self.len || (self.fail_every > 0 && i % self.fail_every == self.fail_every - 1) {
            return Err(Error::Data {
                path: PathBuf::from(format!("synthetic:{i}")),
                message: "synthetic decode failure".into(),
            });
        }
        let c = self.class_of(i);
        let ch = mix64(self.seed.wrapping_mul(31).wrapping_add(c as u64 + 1));
        let base = [
            (ch & 0xff) as f32,
            ((ch >> 8) & 0xff) as f32,
            ((ch >> 16) & 0xff) as f32,
        ];
        let angle = (c as f32) * std::f32::consts::PI / self.num_classes as f32;
        let freq = 0.15 + 0.35 * ((ch >> 24) & 0xff) as f32 / 255.0;
        let item = mix64(self.seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let phase = (item & 0xffff) as f32 / 65535.0 * std::f32::consts::TAU;
        let (sa, ca) = angle.sin_cos();
        let mut data = Vec::with_capacity(self.height * self.width * 3);
        let mut noise = item;
        for y in 0..self.height {
            for x in 0..self.width {
                let t = (x as f32 * ca + y as f32 * sa) * freq + phase;
                let s = 0.5 + 0.5 * t.sin();
                for b in base {
                    noise = mix64(noise);
                    let n = (noise & 0x1f) as f32 - 16.0;
                    data.push((b * (0.35 + 0.65 * s) + n).clamp(0.0, 255.0) as u8);
                }
            }
        }
        Image::from_rgb(self.height, self.width, data)
    }

    fn label(&self, i: usize) -> Option<i64> {
        (i < self.len).then(|| self.class_of(i) as i64)
    }

    fn num_classes(&self) -> Option<usize> {
        Some(self.num_classes)
    }

    fn describe(&self) -> String {
        format!(
            "synthetic ({} images {}x{}, {} classes, seed {})",
            self.len, self.height, self.width, self.num_classes, self.seed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_and_labelled() {
        let s = SyntheticSource::new(20, 12, 10, 4, 7).unwrap();
        let t = SyntheticSource::new(20, 12, 10, 4, 7).unwrap();
        assert_eq!(s.get(3).unwrap(), t.get(3).unwrap());
        assert_ne!(s.get(3).unwrap(), s.get(4).unwrap());
        let img = s.get(0).unwrap();
        assert_eq!((img.height, img.width), (12, 10));
        let classes: std::collections::HashSet<i64> =
            (0..20).map(|i| s.label(i).unwrap()).collect();
        assert!(classes.len() > 1 && classes.iter().all(|&c| (0..4).contains(&c)));
        let f = SyntheticSource::new(20, 4, 4, 2, 0)
            .unwrap()
            .with_fail_every(5);
        assert!(f.get(4).is_err() && f.get(9).is_err() && f.get(5).is_ok());
    }
}
