//! Image sources: MNIST-layout IDX files, an ImageFolder tree and a deterministic synthetic source.
//!
//! Every source yields [`Image`]s as 8-bit **RGB**, height × width × 3 (HWC): single-channel data
//! (IDX files, grayscale JPEG/PNG) is replicated to three identical channels at decode time, so every
//! later stage (augmentation, normalization with the three ImageNet means, the 3-channel stem of the
//! backbone) sees exactly three channels whatever the source.
//!
//! A source may fail on one item (an unreadable or corrupt file); the loader skips such an item and
//! counts it, so `get` returns an error instead of panicking.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod folder;
mod idx;
mod synthetic;

pub use folder::{decode_image, ImageFolderSource};
pub use idx::IdxSource;
pub(crate) use synthetic::mix64;
pub use synthetic::SyntheticSource;

/// An 8-bit RGB image in HWC layout; `data.len() == height * width * 3`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

impl Image {
    /// An RGB image from interleaved HWC bytes.
    pub fn from_rgb(height: usize, width: usize, data: Vec<u8>) -> Result<Self> {
        if height == 0 || width == 0 || data.len() != height * width * 3 {
            return Err(Error::Other(format!(
                "image buffer of {} bytes does not match {height}x{width}x3",
                data.len()
            )));
        }
        Ok(Image {
            height,
            width,
            data,
        })
    }

    /// Replicates a single-channel image to three identical RGB channels.
    pub fn from_gray(height: usize, width: usize, gray: &[u8]) -> Self {
        debug_assert_eq!(gray.len(), height * width);
        let mut data = Vec::with_capacity(gray.len() * 3);
        for &v in gray {
            data.extend_from_slice(&[v, v, v]);
        }
        Image {
            height,
            width,
            data,
        }
    }

    /// The RGB value at row `y`, column `x`.
    pub fn pixel(&self, y: usize, x: usize) -> [u8; 3] {
        let o = (y * self.width + x) * 3;
        [self.data[o], self.data[o + 1], self.data[o + 2]]
    }
}

/// Which split of a dataset to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Test,
}

/// A random-access collection of images with optional integer labels.
pub trait Source: Send + Sync {
    /// Number of items.
    fn len(&self) -> usize;
    /// True when the source holds no item.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decodes item `i` as RGB (see the module docs). May fail for a corrupt item.
    fn get(&self, i: usize) -> Result<Image>;
    /// The class label of item `i`, when the source has labels.
    fn label(&self, i: usize) -> Option<i64>;
    /// Number of classes, when the source has labels.
    fn num_classes(&self) -> Option<usize>;
    /// One line for logs: kind, location, size.
    fn describe(&self) -> String;
}

/// How to open a dataset; part of the job configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceSpec {
    /// A directory with the four standard MNIST-layout IDX files (`train-images-idx3-ubyte`,
    /// `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally
    /// gzipped with a `.gz` suffix), as distributed for MNIST and Fashion-MNIST. The label files are
    /// optional.
    #[serde(alias = "mnist", alias = "idx_dir")]
    FashionMnist { dir: PathBuf },
    /// An ImageFolder tree per split: `<root>/<class>/**/<image>.{jpg,jpeg,png}`, classes sorted by
    /// folder name.
    ImageFolder {
        train: PathBuf,
        #[serde(default)]
        test: Option<PathBuf>,
    },
    /// Deterministic generated images with labels, for tests and benchmarks.
    Synthetic {
        train_len: usize,
        test_len: usize,
        image_size: usize,
        num_classes: usize,
        #[serde(default)]
        seed: u64,
        /// When non-zero, every item `i` with `i % fail_every == fail_every - 1` fails to decode.
        #[serde(default)]
        fail_every: usize,
    },
}

/// Opens one split of the dataset described by `spec`.
pub fn open_source(spec: &SourceSpec, split: Split) -> Result<Arc<dyn Source>> {
    Ok(match spec {
        SourceSpec::FashionMnist { dir } => Arc::new(IdxSource::open_dir(dir, split)?),
        SourceSpec::ImageFolder { train, test } => {
            let root = match split {
                Split::Train => train,
                Split::Test => test.as_ref().ok_or_else(|| {
                    Error::Config(
                        "source.test: an image_folder source needs a `test` folder for evaluation"
                            .into(),
                    )
                })?,
            };
            Arc::new(ImageFolderSource::open(root)?)
        }
        SourceSpec::Synthetic {
            train_len,
            test_len,
            image_size,
            num_classes,
            seed,
            fail_every,
        } => {
            let (len, seed) = match split {
                Split::Train => (*train_len, *seed),
                Split::Test => (*test_len, seed.wrapping_add(0x7e57)),
            };
            Arc::new(
                SyntheticSource::new(len, *image_size, *image_size, *num_classes, seed)?
                    .with_fail_every(*fail_every),
            )
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Subset
// ---------------------------------------------------------------------------------------------

/// The first `len` items of another source (for quick runs on a cut of a dataset).
pub struct Subset {
    inner: Arc<dyn Source>,
    len: usize,
}

impl Subset {
    /// Keeps items `0..min(len, inner.len())`.
    pub fn new(inner: Arc<dyn Source>, len: usize) -> Self {
        let len = len.min(inner.len());
        Subset { inner, len }
    }
}

impl Source for Subset {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, i: usize) -> Result<Image> {
        if i >= self.len {
            return Err(Error::Other(format!(
                "index {i} out of range of a {}-item subset",
                self.len
            )));
        }
        self.inner.get(i)
    }

    fn label(&self, i: usize) -> Option<i64> {
        (i < self.len).then(|| self.inner.label(i)).flatten()
    }

    fn num_classes(&self) -> Option<usize> {
        self.inner.num_classes()
    }

    fn describe(&self) -> String {
        format!("first {} items of {}", self.len, self.inner.describe())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The committed cut of Fashion-MNIST: 512 train images (gzipped) and 256 test images (raw).
    pub(crate) fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-cut")
    }

    #[test]
    fn source_spec_serde_and_open() {
        let spec: SourceSpec = serde_json::from_str(&format!(
            r#"{{"kind":"fashion_mnist","dir":{:?}}}"#,
            fixture_dir().display().to_string()
        ))
        .unwrap();
        let s = open_source(&spec, Split::Test).unwrap();
        assert_eq!(s.len(), 256);
        let spec: SourceSpec = serde_json::from_str(
            r#"{"kind":"synthetic","train_len":10,"test_len":4,"image_size":8,"num_classes":3}"#,
        )
        .unwrap();
        let back: SourceSpec =
            serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(spec, back);
        assert_eq!(open_source(&spec, Split::Train).unwrap().len(), 10);
        assert_eq!(open_source(&spec, Split::Test).unwrap().len(), 4);
        let spec = SourceSpec::ImageFolder {
            train: "/nonexistent".into(),
            test: None,
        };
        assert!(open_source(&spec, Split::Test).is_err());
    }
}
