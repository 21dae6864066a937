//! What a daemon lets a peer make it touch: the paths an assignment names, confined to the
//! daemon's roots, and the checkpoint deletions the coordinator asks for.
use std::path::Path;

use bt_proto::Assignment;

use tracing::{info, warn};

use super::WorkerConfig;

/// Deletes one checkpoint directory if it lies inside `root` (resolved on disk: no `..`, no
/// symbolic link out, not a link itself); a path outside is refused and nothing is touched.
pub(super) fn delete_checkpoint(path: &str, root: &Path) -> Result<(), String> {
    let Some(target) = bt_common::paths::deletable_within("checkpoint", Path::new(path), root)?
    else {
        return Ok(());
    };
    match std::fs::remove_dir_all(&target) {
        Ok(()) => {
            info!(path = %target.display(), "deleted checkpoint");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            warn!(path = %target.display(), error = %e, "cannot delete checkpoint");
            Ok(())
        }
    }
}

/// Every path an assignment names must lie inside this daemon's roots: the checkpoint directory
/// and the checkpoint it resumes from under the checkpoint root, the data under a data root (or
/// the checkpoint root), the checkpoint a probe reads under the checkpoint root.
pub fn confine_assignment(a: &Assignment, cfg: &WorkerConfig) -> Result<(), String> {
    use bt_common::paths::resolve_within;
    let root = &cfg.checkpoint_root;
    resolve_within("checkpoint_dir", Path::new(&a.checkpoint_dir), root)?;
    if !a.resume_from.is_empty() {
        resolve_within("resume_from", Path::new(&a.resume_from), root)?;
    }
    for (i, p) in a.resume_fallbacks.iter().enumerate() {
        resolve_within(&format!("resume_fallbacks[{i}]"), Path::new(p), root)?;
    }
    let spec = bt_common::JobSpec::from_toml_str(&a.spec_toml).map_err(|e| e.to_string())?;
    for (field, p) in spec.read_paths() {
        let p = Path::new(p);
        let ok = if field == "eval.checkpoint" {
            resolve_within(field, p, root).is_ok()
        } else {
            cfg.data_roots
                .iter()
                .chain(std::iter::once(root))
                .filter(|r| r.exists())
                .any(|r| resolve_within(field, p, r).is_ok())
        };
        if !ok {
            return Err(format!(
                "{field}: {} is outside this daemon's {} ({})",
                p.display(),
                if field == "eval.checkpoint" {
                    "checkpoint root"
                } else {
                    "data roots"
                },
                if field == "eval.checkpoint" {
                    root.display().to_string()
                } else {
                    cfg.data_roots
                        .iter()
                        .chain(std::iter::once(root))
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(root: &Path, data: &Path) -> WorkerConfig {
        let mut c: WorkerConfig =
            bt_common::config::load(None, "BT_AGENTTEST_UNUSED", &[]).expect("defaults");
        c.checkpoint_root = root.to_path_buf();
        c.data_roots = vec![data.to_path_buf()];
        c
    }

    /// A forged deletion of `/`, of a path with `..` or through a symbolic link deletes nothing.
    #[test]
    fn deletions_outside_the_checkpoint_root_touch_nothing() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("ckpt");
        let victim = d.path().join("victim");
        std::fs::create_dir_all(root.join("job/10")).unwrap();
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("precious"), "x").unwrap();
        std::os::unix::fs::symlink(&victim, root.join("job/link")).unwrap();
        std::os::unix::fs::symlink(d.path(), root.join("up")).unwrap();
        let forged = [
            "/".to_string(),
            format!("{}/../victim", root.display()),
            format!("{}/job/link", root.display()),
            format!("{}/up/victim", root.display()),
            victim.display().to_string(),
            root.display().to_string(),
        ];
        for p in &forged {
            assert!(delete_checkpoint(p, &root).is_err(), "{p} was accepted");
        }
        assert!(victim.join("precious").exists());
        assert!(root.join("job/10").exists());
        // A real checkpoint inside the root is deleted; a missing one is fine.
        delete_checkpoint(&format!("{}/job/10", root.display()), &root).unwrap();
        assert!(!root.join("job/10").exists());
        delete_checkpoint(&format!("{}/job/11", root.display()), &root).unwrap();
    }

    #[test]
    fn assignments_naming_paths_outside_the_roots_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (root, data) = (d.path().join("ckpt"), d.path().join("data"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(data.join("set")).unwrap();
        let c = cfg(&root, &data);
        let spec = |extra: &str| {
            format!(
                "[data]\nsource = \"image-folder\"\npath = \"{}\"\n{extra}",
                data.join("set").display()
            )
        };
        let ok = Assignment {
            job_id: "j".into(),
            checkpoint_dir: root.join("j").display().to_string(),
            spec_toml: spec(""),
            ..Default::default()
        };
        confine_assignment(&ok, &c).unwrap();
        let bad = [
            Assignment {
                checkpoint_dir: "/etc/bt".into(),
                ..ok.clone()
            },
            Assignment {
                resume_from: format!("{}/../x", root.display()),
                ..ok.clone()
            },
            Assignment {
                resume_from: format!("{}/j/1", root.display()),
                resume_fallbacks: vec![format!("{}/j/0", root.display()), "/etc".into()],
                ..ok.clone()
            },
            Assignment {
                spec_toml: "[data]\nsource = \"image-folder\"\npath = \"/etc\"\n".into(),
                ..ok.clone()
            },
            Assignment {
                spec_toml: "kind = \"linear_probe\"\n[eval]\ncheckpoint = \"/etc/x\"\n".into(),
                ..ok.clone()
            },
        ];
        for a in &bad {
            let e = confine_assignment(a, &c).unwrap_err();
            assert!(e.contains("outside") || e.contains(".."), "{e}");
        }
    }
}
