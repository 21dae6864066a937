//! Image sources: MNIST-layout IDX files, an ImageFolder tree and a deterministic synthetic source.
//!
//! Every source yields [`Image`]s as 8-bit **RGB**, height × width × 3 (HWC): single-channel data
//! (IDX files, grayscale JPEG/PNG) is replicated to three identical channels at decode time, so every
//! later stage (augmentation, normalization with the three ImageNet means, the 3-channel stem of the
//! backbone) sees exactly three channels whatever the source.
//!
//! A source may fail on one item (an unreadable or corrupt file); the loader skips such an item and
//! counts it, so `get` returns an error instead of panicking.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
// IDX
// ---------------------------------------------------------------------------------------------

/// Reads a file, transparently inflating it when it starts with the gzip magic (1f 8b).
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.len() >= 2 && raw[0] == 0x1f && raw[1] == 0x8b {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::Data {
                path: path.to_path_buf(),
                message: format!("corrupt gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// A parsed IDX array of unsigned bytes.
#[derive(Debug)]
struct IdxArray {
    dims: Vec<usize>,
    data: Vec<u8>,
}

/// Parses an IDX file whose element type must be unsigned byte (0x08) with `ndims` dimensions,
/// i.e. magic `00 00 08 0<ndims>`.
fn parse_idx(path: &Path, bytes: Vec<u8>, ndims: u8) -> Result<IdxArray> {
    let data_err = |message: String| Error::Data {
        path: path.to_path_buf(),
        message,
    };
    let expected = [0u8, 0, 0x08, ndims];
    if bytes.len() < 4 || bytes[..4] != expected {
        let got: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(data_err(format!(
            "bad IDX magic [{}]: expected 0x0000080{ndims} (unsigned bytes, {ndims} dimension{}); \
             is this an MNIST-layout IDX file (raw or gzipped)?",
            got.join(" "),
            if ndims == 1 { "" } else { "s" },
        )));
    }
    let header = 4 + 4 * ndims as usize;
    if bytes.len() < header {
        return Err(data_err(format!(
            "truncated IDX header: {} bytes, need {header}",
            bytes.len()
        )));
    }
    let dims: Vec<usize> = (0..ndims as usize)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let want: usize = dims.iter().product();
    let have = bytes.len() - header;
    if have != want {
        return Err(data_err(format!(
            "IDX header declares dimensions {dims:?} ({want} bytes of data) but the file holds {have}"
        )));
    }
    let mut bytes = bytes;
    bytes.drain(..header);
    Ok(IdxArray { dims, data: bytes })
}

/// MNIST-layout IDX images (`idx3`, u8, N × H × W) with optional labels (`idx1`, u8, N), held in
/// memory. Images are replicated to RGB by [`Source::get`].
pub struct IdxSource {
    images_path: PathBuf,
    len: usize,
    height: usize,
    width: usize,
    pixels: Vec<u8>,
    labels: Option<Vec<u8>>,
    num_classes: Option<usize>,
}

impl IdxSource {
    /// Opens an images file and an optional labels file (each raw or gzipped, detected by magic).
    pub fn open(images: &Path, labels: Option<&Path>) -> Result<Self> {
        let img = parse_idx(images, read_maybe_gzip(images)?, 3)?;
        let (len, height, width) = (img.dims[0], img.dims[1], img.dims[2]);
        if height == 0 || width == 0 {
            return Err(Error::Data {
                path: images.to_path_buf(),
                message: format!("images of size {height}x{width}"),
            });
        }
        let (labels, num_classes) = match labels {
            None => (None, None),
            Some(lp) => {
                let lab = parse_idx(lp, read_maybe_gzip(lp)?, 1)?;
                if lab.dims[0] != len {
                    return Err(Error::Data {
                        path: lp.to_path_buf(),
                        message: format!(
                            "{} labels for {len} images in {}",
                            lab.dims[0],
                            images.display()
                        ),
                    });
                }
                let classes = lab.data.iter().copied().max().map(|m| m as usize + 1);
                (Some(lab.data), classes)
            }
        };
        Ok(IdxSource {
            images_path: images.to_path_buf(),
            len,
            height,
            width,
            pixels: img.data,
            labels,
            num_classes,
        })
    }

    /// Opens one split of a directory holding the standard MNIST file names (optionally `.gz`).
    pub fn open_dir(dir: &Path, split: Split) -> Result<Self> {
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let find = |stem: String| -> Option<PathBuf> {
            [stem.clone(), format!("{stem}.gz")]
                .into_iter()
                .map(|n| dir.join(n))
                .find(|p| p.is_file())
        };
        let images_name = format!("{prefix}-images-idx3-ubyte");
        let images = find(images_name.clone()).ok_or_else(|| Error::Data {
            path: dir.to_path_buf(),
            message: format!(
                "no {images_name} or {images_name}.gz here; expected a directory with the four \
                 MNIST-layout IDX files"
            ),
        })?;
        let labels = find(format!("{prefix}-labels-idx1-ubyte"));
        Self::open(&images, labels.as_deref())
    }

    /// (height, width) of every image.
    pub fn image_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }
}

impl Source for IdxSource {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, i: usize) -> Result<Image> {
        if i >= self.len {
            return Err(Error::Data {
                path: self.images_path.clone(),
                message: format!("index {i} out of range ({} images)", self.len),
            });
        }
        let n = self.height * self.width;
        Ok(Image::from_gray(
            self.height,
            self.width,
            &self.pixels[i * n..(i + 1) * n],
        ))
    }

    fn label(&self, i: usize) -> Option<i64> {
        self.labels.as_ref()?.get(i).map(|&l| l as i64)
    }

    fn num_classes(&self) -> Option<usize> {
        self.num_classes
    }

    fn describe(&self) -> String {
        format!(
            "idx {} ({} images {}x{}, {})",
            self.images_path.display(),
            self.len,
            self.height,
            self.width,
            match self.num_classes {
                Some(c) => format!("{c} classes"),
                None => "unlabelled".into(),
            }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// ImageFolder
// ---------------------------------------------------------------------------------------------

fn is_image_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

/// Collects image files under `dir` recursively, sorted by path.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect::<Result<_>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_images(&p, out)?;
        } else if is_image_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// A folder tree `<root>/<class>/**/<image>` (torchvision's ImageFolder layout): classes are the
/// sub-folders sorted by name, label = class position. Files are only listed at open time and are
/// decoded lazily by [`Source::get`] (on the loader threads).
pub struct ImageFolderSource {
    root: PathBuf,
    classes: Vec<String>,
    items: Vec<(PathBuf, u32)>,
}

impl ImageFolderSource {
    pub fn open(root: &Path) -> Result<Self> {
        let mut class_dirs: Vec<PathBuf> = fs::read_dir(root)
            .map_err(|e| Error::io(root, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        class_dirs.sort();
        if class_dirs.is_empty() {
            return Err(Error::Data {
                path: root.to_path_buf(),
                message: "no class sub-folders: expected <root>/<class>/<image>.jpg|png".into(),
            });
        }
        let mut classes = Vec::with_capacity(class_dirs.len());
        let mut items = Vec::new();
        for (c, dir) in class_dirs.iter().enumerate() {
            let mut files = Vec::new();
            collect_images(dir, &mut files)?;
            if files.is_empty() {
                return Err(Error::Data {
                    path: dir.clone(),
                    message: "class folder has no .jpg/.jpeg/.png image; remove it or add images"
                        .into(),
                });
            }
            classes.push(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            items.extend(files.into_iter().map(|f| (f, c as u32)));
        }
        Ok(ImageFolderSource {
            root: root.to_path_buf(),
            classes,
            items,
        })
    }

    /// Class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Path of item `i`.
    pub fn path(&self, i: usize) -> Option<&Path> {
        self.items.get(i).map(|(p, _)| p.as_path())
    }
}

/// Decodes JPEG/PNG bytes to RGB (grayscale and alpha images are converted).
pub fn decode_image(path: &Path, bytes: &[u8]) -> Result<Image> {
    let img = image::load_from_memory(bytes).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        message: format!("cannot decode image: {e}"),
    })?;
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    Image::from_rgb(h as usize, w as usize, rgb.into_raw()).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl Source for ImageFolderSource {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn get(&self, i: usize) -> Result<Image> {
        let (path, _) = self.items.get(i).ok_or_else(|| Error::Data {
            path: self.root.clone(),
            message: format!("index {i} out of range ({} images)", self.items.len()),
        })?;
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        decode_image(path, &bytes)
    }

    fn label(&self, i: usize) -> Option<i64> {
        self.items.get(i).map(|(_, c)| *c as i64)
    }

    fn num_classes(&self) -> Option<usize> {
        Some(self.classes.len())
    }

    fn describe(&self) -> String {
        format!(
            "image folder {} ({} images, {} classes)",
            self.root.display(),
            self.items.len(),
            self.classes.len()
        )
    }
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

// ---------------------------------------------------------------------------------------------
// Synthetic
// ---------------------------------------------------------------------------------------------

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

    /// The committed cut of Fashion-MNIST: 512 train images (gzipped) and 256 test images (raw).
    pub(crate) fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-cut")
    }

    #[test]
    fn idx_parses_gzipped_and_raw_cut() {
        let train = IdxSource::open_dir(&fixture_dir(), Split::Train).unwrap();
        let test = IdxSource::open_dir(&fixture_dir(), Split::Test).unwrap();
        assert_eq!(train.len(), 512);
        assert_eq!(test.len(), 256);
        assert_eq!(train.image_size(), (28, 28));
        assert_eq!(train.num_classes(), Some(10));
        assert_eq!(test.num_classes(), Some(10));
        // First Fashion-MNIST training label is 9 (ankle boot), then 0, 0, 3; first test label 9, 2.
        let labels: Vec<i64> = (0..4).map(|i| train.label(i).unwrap()).collect();
        assert_eq!(labels, vec![9, 0, 0, 3]);
        assert_eq!((test.label(0), test.label(1)), (Some(9), Some(2)));
        let img = train.get(0).unwrap();
        assert_eq!(
            (img.height, img.width, img.data.len()),
            (28, 28, 28 * 28 * 3)
        );
        // Gray replicated to RGB, the border is background (0) and the item is not blank.
        assert!(img.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        assert_eq!(img.pixel(0, 0), [0, 0, 0]);
        assert!(img.data.iter().map(|&v| v as u64).sum::<u64>() > 10_000);
        assert!(train.get(512).is_err());
        assert!(train.describe().contains("512 images 28x28"));
    }

    #[test]
    fn idx_bad_magic_names_path_and_expected_magic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train-images-idx3-ubyte");
        fs::write(&p, [0u8, 0, 8, 1, 0, 0, 0, 0]).unwrap(); // a labels magic in an images file
        let err = IdxSource::open(&p, None).err().unwrap().to_string();
        assert!(err.contains(&p.display().to_string()), "{err}");
        assert!(err.contains("0x00000803"), "{err}");
        fs::write(&p, b"GIF89a...").unwrap();
        let err = IdxSource::open(&p, None).err().unwrap().to_string();
        assert!(err.contains("bad IDX magic"), "{err}");
        // A truncated body is reported too.
        fs::write(
            &p,
            [0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3],
        )
        .unwrap();
        let err = IdxSource::open(&p, None).err().unwrap().to_string();
        assert!(err.contains("holds 3"), "{err}");
    }

    #[test]
    fn idx_dir_without_files_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = IdxSource::open_dir(dir.path(), Split::Train)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("train-images-idx3-ubyte"), "{err}");
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

    fn write_png(path: &Path, gray: bool) {
        if gray {
            image::GrayImage::from_fn(9, 7, |x, y| image::Luma([(x * 20 + y) as u8]))
                .save(path)
                .unwrap();
        } else {
            image::RgbImage::from_fn(9, 7, |x, y| image::Rgb([x as u8, y as u8, 200]))
                .save(path)
                .unwrap();
        }
    }

    #[test]
    fn image_folder_lists_classes_and_decodes_lazily() {
        let dir = tempfile::tempdir().unwrap();
        for (c, n) in [("cat", 2), ("dog", 3)] {
            fs::create_dir_all(dir.path().join(c).join("sub")).unwrap();
            for k in 0..n {
                write_png(&dir.path().join(c).join(format!("{k}.png")), k == 0);
            }
        }
        write_png(&dir.path().join("dog/sub/x.png"), false);
        fs::write(dir.path().join("dog/notes.txt"), "not an image").unwrap();
        let s = ImageFolderSource::open(dir.path()).unwrap();
        assert_eq!(s.classes(), ["cat", "dog"]);
        assert_eq!(s.len(), 6);
        assert_eq!(s.label(0), Some(0));
        assert_eq!(s.label(5), Some(1));
        let g = s.get(0).unwrap(); // grayscale PNG → replicated RGB
        assert_eq!((g.height, g.width), (7, 9));
        assert_eq!(g.pixel(1, 2), [41, 41, 41]);
        assert_eq!(s.get(1).unwrap().pixel(3, 4), [4, 3, 200]);
        // A garbage file fails on get only (decoded lazily), naming the file.
        fs::write(dir.path().join("cat/zz.jpg"), b"garbage").unwrap();
        let s = ImageFolderSource::open(dir.path()).unwrap();
        let err = s.get(2).err().unwrap().to_string();
        assert!(err.contains("zz.jpg"), "{err}");
    }

    #[test]
    fn image_folder_empty_layouts_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageFolderSource::open(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no class sub-folders"), "{err}");
        fs::create_dir(dir.path().join("a")).unwrap();
        fs::create_dir(dir.path().join("b")).unwrap();
        write_png(&dir.path().join("a/1.png"), false);
        let err = ImageFolderSource::open(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/b") && err.contains("no .jpg"), "{err}");
    }
}
