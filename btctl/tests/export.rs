//! `btctl export` against PyTorch: a checkpoint written by the trainer's own code is exported to
//! `.pth` and `.safetensors` (with the projector), then `tests/export_reference.py` loads both
//! into stock torchvision ResNets (`load_state_dict(strict=True)`, `fc` removed) and checks their
//! outputs on a fixed batch against bt's backbone to 1e-5. A corrupt checkpoint is refused with
//! its path and leaves no output file.
//!
//! Needs a Python with torch, torchvision and safetensors: `$BT_PYTHON` if set, else `python3`
//! (scripts/env.sh puts the project's venv first on PATH).
use std::path::{Path, PathBuf};
use std::process::Command;

use bt_worker::checkpoint;
use bt_worker::model::{Arch, BarlowTwinsModel, ModelConfig};
use bt_worker::optim::{Lars, LarsConfig};
use tch::{nn, Device, Kind, Tensor};

fn python() -> String {
    std::env::var("BT_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn btctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_btctl"))
        .args(args)
        .output()
        .expect("running btctl")
}

/// A checkpoint of a model with non-trivial BN statistics and affine parameters, the fixed batch
/// and bt's backbone output on it (eval mode).
fn checkpoint_and_reference(dir: &Path, cifar_stem: bool) -> (PathBuf, PathBuf) {
    tch::manual_seed(11);
    let cfg = ModelConfig {
        cifar_stem,
        projector: vec![32, 16],
        ..ModelConfig::new(Arch::Resnet18)
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let m = BarlowTwinsModel::new(&vs.root(), &cfg).unwrap();
    tch::no_grad(|| {
        for t in m.state() {
            let mut v = t.tensor.shallow_clone();
            let is_bn_weight = t.name.contains("bn") && t.name.ends_with("weight");
            if t.name.ends_with("running_mean") {
                v.copy_(&(v.randn_like() * 0.1));
            } else if t.name.ends_with("running_var") || is_bn_weight {
                v.copy_(&(v.rand_like() + 0.5));
            }
        }
    });
    let opt = Lars::new(&m.parameters(), LarsConfig::default(), 4, 1, 10);
    let ck = dir.join(if cifar_stem {
        "ck-cifar"
    } else {
        "ck-imagenet"
    });
    checkpoint::save(&ck, &m, &opt, 7, 1, "").unwrap();
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let y = m.backbone_forward(&x, false).unwrap();
    let io = dir.join(if cifar_stem {
        "io-cifar.safetensors"
    } else {
        "io.safetensors"
    });
    Tensor::write_safetensors(&[("x", &x), ("y", &y)], &io).unwrap();
    (ck, io)
}

#[test]
fn exports_load_in_torchvision_and_match_the_backbone() {
    let dir = tempfile::tempdir().unwrap();
    for cifar_stem in [false, true] {
        let (ck, io) = checkpoint_and_reference(dir.path(), cifar_stem);
        let pth = dir.path().join(format!("backbone-{cifar_stem}.pth"));
        let st = dir
            .path()
            .join(format!("backbone-{cifar_stem}.safetensors"));
        let a = btctl(&["export", ck.to_str().unwrap(), "-o", pth.to_str().unwrap()]);
        assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
        let out = String::from_utf8_lossy(&a.stdout);
        assert!(out.contains("torchvision.models.resnet18()"), "{out}");
        assert!(out.contains("load_state_dict(sd)"), "{out}");
        let b = btctl(&[
            "export",
            ck.to_str().unwrap(),
            "-o",
            st.to_str().unwrap(),
            "--projector",
        ]);
        assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
        let r = Command::new(python())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/export_reference.py"
            ))
            .args([&pth, &st, &io])
            .arg("resnet18")
            .arg(if cifar_stem { "1" } else { "0" })
            .output()
            .expect("running python");
        assert!(
            r.status.success(),
            "reference failed:\n{}\n{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
}

#[test]
fn a_corrupt_checkpoint_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let (ck, _) = checkpoint_and_reference(dir.path(), false);
    let model = ck.join(checkpoint::MODEL_FILE);
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&model, bytes).unwrap();
    let out = dir.path().join("b.pth");
    let r = btctl(&["export", ck.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains(ck.to_str().unwrap()), "{err}");
    assert!(!out.exists(), "a refused export left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    // A bad extension is refused before anything is read.
    let r = btctl(&["export", ck.to_str().unwrap(), "-o", "b.zip"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains(".safetensors, .pth or .pt"));
}
