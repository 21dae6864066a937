//! MNIST-layout IDX files (raw or gzipped), held in memory.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{Image, Source, Split};
use crate::error::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::tests::fixture_dir;

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
}
