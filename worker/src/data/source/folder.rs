//! An ImageFolder tree of JPEG/PNG files, listed at open time and decoded lazily.

use std::fs;
use std::path::{Path, PathBuf};

use super::{Image, Source};
use crate::error::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;

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
