//! The evaluation batcher: a deterministic resize + center-crop of source items, decoded in
//! parallel, for the kNN monitor and the linear probe.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::augment::{IMAGENET_MEAN, IMAGENET_STD};
use super::colour_device::normalize;
use super::resample::resize_center_crop_chw;
use super::source::Source;
use crate::error::{Error, Result};

/// Deterministic evaluation transform: resize the shorter side to `resize` (bilinear, antialiased),
/// center-crop `crop`, normalize.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalTransform {
    pub resize: usize,
    pub crop: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl EvalTransform {
    /// The usual transform for `image_size`: resize to 8/7 of it then center-crop (256 → 224) for
    /// large images; a plain resize to `image_size` below 96 pixels (CIFAR, Fashion-MNIST).
    pub fn for_size(image_size: usize) -> Self {
        let resize = if image_size >= 96 {
            (image_size as f64 * 8.0 / 7.0).round() as usize
        } else {
            image_size
        };
        EvalTransform {
            resize,
            crop: image_size,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

/// One evaluation batch, u8 after resize and crop.
pub struct EvalBatch {
    /// u8 [n, 3, crop, crop] on the CPU.
    pub images: Tensor,
    /// i64 [n] when every item has a label.
    pub labels: Option<Tensor>,
    /// Source indices of the rows (unreadable items are left out).
    pub indices: Vec<usize>,
    pub skipped: u64,
    mean: [f32; 3],
    std: [f32; 3],
}

impl EvalBatch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Normalized f32 [n, 3, crop, crop] on `device`.
    pub fn normalized(&self, device: Device) -> Result<Tensor> {
        normalize(&self.images.f_to_device(device)?, self.mean, self.std)
    }
}

/// One decoded evaluation item: (source index, label, CHW pixels).
type Decoded = (usize, Option<i64>, Vec<u8>);

/// Iterates over `indices` of `source` in batches of `batch` (the last one may be smaller),
/// decoding in parallel on the global rayon pool. Unreadable items are skipped with a warning and
/// counted; a batch in which every item failed is returned empty.
pub fn eval_batches<'a>(
    source: &'a dyn Source,
    indices: &'a [usize],
    transform: EvalTransform,
    batch: usize,
) -> impl Iterator<Item = Result<EvalBatch>> + 'a {
    indices.chunks(batch.max(1)).map(move |chunk| {
        if transform.crop == 0 || transform.resize < transform.crop {
            return Err(Error::Config(format!(
                "eval transform: resize {} must be >= crop {} > 0",
                transform.resize, transform.crop
            )));
        }
        let c = transform.crop;
        let per = 3 * c * c;
        let decoded: Vec<Option<Decoded>> = chunk
            .par_iter()
            .map(|&i| match source.get(i) {
                Ok(img) => {
                    let mut out = vec![0u8; per];
                    resize_center_crop_chw(&img, transform.resize, c, &mut out);
                    Some((i, source.label(i), out))
                }
                Err(e) => {
                    tracing::warn!(index = i, error = %e, "skipping unreadable image");
                    None
                }
            })
            .collect();
        let skipped = decoded.iter().filter(|d| d.is_none()).count() as u64;
        let ok: Vec<_> = decoded.into_iter().flatten().collect();
        let mut buf = Vec::with_capacity(ok.len() * per);
        for (_, _, px) in &ok {
            buf.extend_from_slice(px);
        }
        let labels = ok
            .iter()
            .map(|(_, l, _)| *l)
            .collect::<Option<Vec<i64>>>()
            .map(|l| Tensor::from_slice(&l));
        Ok(EvalBatch {
            images: Tensor::from_slice(&buf).view([ok.len() as i64, 3, c as i64, c as i64]),
            labels,
            indices: ok.iter().map(|(i, _, _)| *i).collect(),
            skipped,
            mean: transform.mean,
            std: transform.std,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::tests::fixture_dir;
    use crate::data::source::{IdxSource, Split};

    #[test]
    fn eval_batches_cover_indices_in_order() {
        let src = IdxSource::open_dir(&fixture_dir(), Split::Train).unwrap();
        let idx: Vec<usize> = (0..10).collect();
        let batches: Vec<EvalBatch> = eval_batches(&src, &idx, EvalTransform::for_size(28), 4)
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[2].indices, vec![8, 9]);
        // 28 → 28: the image itself, replicated to 3 channels.
        let img = src.get(0).unwrap();
        let row: Vec<u8> = Vec::try_from(batches[0].images.get(0).get(1).get(5)).unwrap();
        let want: Vec<u8> = (0..28).map(|x| img.pixel(5, x)[1]).collect();
        assert_eq!(row, want);
        let x = batches[0].normalized(Device::Cpu).unwrap();
        assert_eq!(x.size(), vec![4, 3, 28, 28]);
        let labels: Vec<i64> = Vec::try_from(batches[0].labels.as_ref().unwrap()).unwrap();
        assert_eq!(labels, vec![9, 0, 0, 3]);
    }
}
