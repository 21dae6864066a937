//! Confinement of the paths a peer names: a checkpoint a daemon is told to delete, the directory a
//! trainer is told to write, the data a job reads. The coordinator checks lexically (it may not
//! see the files); a daemon also resolves symbolic links on its own disk.
use std::path::{Component, Path, PathBuf};

/// `path` with `.` components dropped; an error for `..` or an empty path.
fn normalized(what: &str, path: &Path) -> Result<PathBuf, String> {
    if path.as_os_str().is_empty() {
        return Err(format!("{what}: empty path"));
    }
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                return Err(format!("{what}: {} must not contain '..'", path.display()))
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Checks without touching the disk that `path` lies strictly inside `root` (no `..`, not the root
/// itself). Both are compared as written, after dropping `.` components.
pub fn lexically_within(what: &str, path: &Path, root: &Path) -> Result<(), String> {
    let p = normalized(what, path)?;
    let r = normalized("root", root).map_err(|e| format!("{what}: {e}"))?;
    if p != r && p.starts_with(&r) {
        Ok(())
    } else {
        Err(format!(
            "{what}: {} is outside {}",
            path.display(),
            root.display()
        ))
    }
}

/// Whether `path` lies (lexically) inside or at any of `roots`.
pub fn lexically_under_any(path: &Path, roots: &[PathBuf]) -> bool {
    let Ok(p) = normalized("path", path) else {
        return false;
    };
    roots
        .iter()
        .filter_map(|r| normalized("root", r).ok())
        .any(|r| p.starts_with(&r))
}

/// Resolves `path` on disk, following symbolic links in every existing component (components that
/// do not exist yet are appended as written), and checks that the result lies strictly inside
/// `root` (itself resolved). Returns the resolved path. `..` is refused outright.
pub fn resolve_within(what: &str, path: &Path, root: &Path) -> Result<PathBuf, String> {
    let p = normalized(what, path)?;
    let root = root
        .canonicalize()
        .map_err(|e| format!("{what}: root {}: {e}", root.display()))?;
    let p = if p.is_relative() {
        std::env::current_dir()
            .map_err(|e| format!("{what}: {e}"))?
            .join(p)
    } else {
        p
    };
    // The deepest ancestor that exists, resolved; the rest appended.
    let mut existing = p.as_path();
    let mut tail = Vec::new();
    let resolved = loop {
        match existing.canonicalize() {
            Ok(r) => break r,
            Err(_) => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(format!("{what}: {} cannot be resolved", path.display()));
                };
                tail.push(name.to_owned());
                existing = parent;
            }
        }
    };
    let mut full = resolved;
    for name in tail.into_iter().rev() {
        full.push(name);
    }
    if full != root && full.starts_with(&root) {
        Ok(full)
    } else {
        Err(format!(
            "{what}: {} is outside {}",
            path.display(),
            root.display()
        ))
    }
}

/// Like [`resolve_within`] for a directory about to be deleted: its parent is resolved (so a
/// symbolic link on the way out is caught) and the path itself must not be a symbolic link.
/// Returns None when there is nothing to delete.
pub fn deletable_within(what: &str, path: &Path, root: &Path) -> Result<Option<PathBuf>, String> {
    let p = normalized(what, path)?;
    let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
        return Err(format!("{what}: {} has no parent", path.display()));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let target = match resolve_within(what, parent, root) {
        Ok(dir) => dir.join(name),
        // The parent may be the root itself (a checkpoint directly under it).
        Err(_) if parent.canonicalize().ok() == root.canonicalize().ok() => parent
            .canonicalize()
            .map_err(|e| format!("{what}: {e}"))?
            .join(name),
        Err(e) => return Err(e),
    };
    match std::fs::symlink_metadata(&target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{what}: {}: {e}", path.display())),
        Ok(m) if m.file_type().is_symlink() => Err(format!(
            "{what}: {} is a symbolic link (checkpoints never are)",
            path.display()
        )),
        Ok(_) => Ok(Some(target)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_checks() {
        let r = Path::new("/c/root");
        assert!(lexically_within("p", Path::new("/c/root/j/1"), r).is_ok());
        assert!(lexically_within("p", Path::new("/c/root/./j"), r).is_ok());
        assert!(lexically_within("p", Path::new("/c/root"), r).is_err());
        assert!(lexically_within("p", Path::new("/c/root/../x"), r).is_err());
        assert!(lexically_within("p", Path::new("/c/rootx/j"), r).is_err());
        assert!(lexically_within("p", Path::new("/"), r).is_err());
        assert!(lexically_within("p", Path::new("ck/j/1"), Path::new("ck")).is_ok());
        assert!(lexically_under_any(
            Path::new("/usr/share/datasets/fm"),
            &["/usr/share/datasets".into()]
        ));
        assert!(!lexically_under_any(
            Path::new("/etc"),
            &["/usr/share/datasets".into()]
        ));
    }

    #[test]
    fn symlinks_are_resolved() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(root.join("job/1")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("job/link")).unwrap();
        assert!(resolve_within("p", &root.join("job/1"), &root).is_ok());
        assert!(resolve_within("p", &root.join("job/new/dir"), &root).is_ok());
        assert!(resolve_within("p", &root.join("escape/x"), &root).is_err());
        assert_eq!(
            deletable_within("p", &root.join("job/1"), &root).unwrap(),
            Some(root.canonicalize().unwrap().join("job/1"))
        );
        assert_eq!(
            deletable_within("p", &root.join("job/2"), &root).unwrap(),
            None
        );
        assert!(deletable_within("p", &root.join("escape/x"), &root).is_err());
        assert!(deletable_within("p", &root.join("job/link"), &root).is_err());
        assert!(deletable_within("p", Path::new("/"), &root).is_err());
        assert!(deletable_within("p", &root, &root).is_err());
    }
}
