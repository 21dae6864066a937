//! Numerical checks against an independent PyTorch reference
//! (`tests/reference/bt_reference.py`: torchvision's ResNet, and the loss and LARS written in
//! Python from their definitions).
//!
//! Needs a Python with torch, torchvision and safetensors: `$BT_PYTHON` if set, else `python3`
//! from PATH (`source scripts/env.sh` puts the project's torch venv first). The tests fail, not
//! skip, when it is missing: a reference check that silently passes would check nothing.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bt_worker::loss::{barlow_twins_loss_with, LossForm, LossOptions, DEFAULT_LAMBDA};
use bt_worker::model::{Arch, BarlowTwinsModel, ModelConfig, NamedTensor, TensorRole};
use bt_worker::optim::{Lars, LarsConfig};
use tch::{nn, Device, Kind, Tensor};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/bt_reference.py")
}

fn python() -> String {
    std::env::var("BT_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Runs the reference in `dir` and returns its out.safetensors.
fn run_reference(mode: &str, dir: &Path, args: serde_json::Value) -> HashMap<String, Tensor> {
    std::fs::write(dir.join("args.json"), serde_json::to_vec(&args).unwrap()).unwrap();
    let py = python();
    let out = Command::new(&py)
        .arg(script())
        .arg(mode)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot start {py} (set BT_PYTHON or source scripts/env.sh): {e}")
        });
    assert!(
        out.status.success(),
        "reference {mode} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Tensor::read_safetensors(dir.join("out.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn write(tensors: &[(&str, &Tensor)], path: &Path) {
    let v: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), t.detach().contiguous()))
        .collect();
    Tensor::write_safetensors(&v, path).unwrap();
}

fn write_named(tensors: &[NamedTensor], path: &Path) {
    bt_worker::model::write_safetensors(tensors, path).unwrap();
}

/// Largest |got − want| relative to the reference's own scale max|want| (so small tensors such
/// as LARS updates are checked as strictly as large ones); all-zero references compare
/// absolutely.
fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.size(), want.size(), "{name}: shape");
    let g = got.to_kind(Kind::Double);
    let w = want.to_kind(Kind::Double);
    let scale = w.abs().max().double_value(&[]);
    let scale = if scale > 0.0 { scale } else { 1.0 };
    let err = (&g - &w).abs().max().double_value(&[]) / scale;
    if std::env::var_os("BT_REFERENCE_VERBOSE").is_some() {
        eprintln!("{name}: max relative error {err:e} (tolerance {tol:e})");
    }
    assert!(
        err <= tol,
        "{name}: max error {err:e} (relative to {scale:e}) > {tol:e}"
    );
}

/// Replaces BN γ/β and running statistics with random values, so that zero-initialised residual
/// branches and identity-like BNs cannot hide a wiring mistake.
fn randomize_bn(state: &[NamedTensor]) {
    tch::no_grad(|| {
        for t in state {
            let mut d = t.tensor.shallow_clone();
            let n = &t.name;
            if t.role == TensorRole::Parameter && t.tensor.dim() == 1 && n.ends_with(".weight") {
                let _ = d.uniform_(0.5, 1.5);
            } else if (t.role == TensorRole::Parameter && n.ends_with(".bias"))
                || n.ends_with("running_mean")
            {
                let _ = d.normal_(0.0, 0.1);
            } else if n.ends_with("running_var") {
                let _ = d.uniform_(0.5, 1.5);
            }
        }
    });
}

/// A ResNet-18 backbone (projector [8]) with random BN values, its torchvision-named weights
/// saved in a fresh directory as weights.safetensors.
fn resnet18_saved(
    seed: i64,
    cifar_stem: bool,
    stem_stride: i64,
) -> (nn::VarStore, BarlowTwinsModel, tempfile::TempDir) {
    tch::manual_seed(seed);
    let cfg = ModelConfig {
        cifar_stem,
        stem_stride,
        projector: vec![8],
        ..ModelConfig::new(Arch::Resnet18)
    };
    let (vs, m) = model(&cfg, Kind::Float);
    randomize_bn(&m.state());
    let dir = tempfile::tempdir().unwrap();
    m.save_backbone_safetensors(&dir.path().join("weights.safetensors"))
        .unwrap();
    (vs, m, dir)
}

fn model(cfg: &ModelConfig, kind: Kind) -> (nn::VarStore, BarlowTwinsModel) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = BarlowTwinsModel::new(&vs.root(), cfg).unwrap();
    if kind == Kind::Double {
        vs.double();
    }
    (vs, m)
}

/// (a) ResNet-18 backbone vs torchvision with the same weights, eval and train mode, both stems
/// (the CIFAR one also at stride 2).
/// fp32 on both sides, the production precision. Tolerance 1e-4 relative to the output scale:
/// both call the same ATen kernels (on this CPU the results come out bit-identical), but kernel
/// selection may differ by call path or machine (oneDNN conv algorithms), fp32 rounding is
/// ~1e-7 per op, and train-mode BN over a 4-image batch divides by small standard deviations,
/// which amplifies rounding differences ~10-100×. A wiring mistake changes outputs by O(1).
#[test]
fn backbone_matches_torchvision() {
    for (cifar_stem, stride, hw) in [(true, 1, 16), (true, 2, 32), (false, 1, 64)] {
        let (_vs, m, dir) = resnet18_saved(11, cifar_stem, stride);
        let x = Tensor::randn([4, 3, hw, hw], (Kind::Float, Device::Cpu));
        write(&[("x", &x)], &dir.path().join("input.safetensors"));
        let eval = tch::no_grad(|| m.backbone_forward(&x, false)).unwrap();
        let train = tch::no_grad(|| m.backbone_forward(&x, true)).unwrap();
        let want = run_reference(
            "backbone",
            dir.path(),
            serde_json::json!({"arch": "resnet18", "cifar_stem": cifar_stem, "stem_stride": stride}),
        );
        let tag = match (cifar_stem, stride) {
            (true, 1) => "cifar",
            (true, _) => "cifar stride 2",
            _ => "imagenet",
        };
        assert_close(&format!("{tag} eval"), &eval, &want["eval"], 1e-4);
        assert_close(&format!("{tag} train"), &train, &want["train"], 1e-4);
        // Running statistics after one training-mode forward (momentum 0.1, unbiased variance).
        let mut checked = 0;
        for t in m.backbone_state() {
            if let Some(w) = want.get(&format!("state.{}", t.name)) {
                assert_close(&t.name, &t.tensor, w, 1e-4);
                checked += 1;
            }
        }
        assert_eq!(
            checked,
            20 * 3,
            "every BN's running_mean/var/num_batches_tracked compared"
        );
    }
}

/// (b) Loss value and gradients w.r.t. both inputs, both forms, in f64 (the loss keeps f64
/// inputs in f64). Tolerance 1e-10: the computations agree up to summation order, and the Gram
/// form's (Σ C² − Σ C_ii²) subtraction loses at most a few digits at these sizes.
#[test]
fn loss_and_gradients_match_reference() {
    for (n, d, lambda) in [(6, 10, DEFAULT_LAMBDA), (12, 5, 0.005), (8, 8, 0.1)] {
        tch::manual_seed(n);
        let za = Tensor::randn([n, d], (Kind::Double, Device::Cpu));
        let zb = &za * 0.7 + Tensor::randn([n, d], (Kind::Double, Device::Cpu)) * 0.5;
        let dir = tempfile::tempdir().unwrap();
        write(
            &[("za", &za), ("zb", &zb)],
            &dir.path().join("input.safetensors"),
        );
        let want = run_reference("loss", dir.path(), serde_json::json!({"lambda": lambda}));
        for form in [LossForm::Cross, LossForm::Gram] {
            let a = za.detach().set_requires_grad(true);
            let b = zb.detach().set_requires_grad(true);
            let opts = LossOptions {
                lambda,
                form,
                stats: true,
                ..LossOptions::default()
            };
            let out = barlow_twins_loss_with(&a, &b, &opts).unwrap();
            out.loss.backward();
            let tag = format!("{form:?} n={n} d={d}");
            assert_close(
                &format!("{tag} loss"),
                &out.loss.reshape([1]),
                &want["loss"],
                1e-10,
            );
            let on = Tensor::from_slice(&[out.stats.on_diag]);
            let off = Tensor::from_slice(&[out.stats.off_diag]);
            assert_close(&format!("{tag} on_diag"), &on, &want["on_diag"], 1e-10);
            assert_close(&format!("{tag} off_diag"), &off, &want["off_diag"], 1e-10);
            assert_close(&format!("{tag} grad_a"), &a.grad(), &want["grad_a"], 1e-10);
            assert_close(&format!("{tag} grad_b"), &b.grad(), &want["grad_b"], 1e-10);
        }
    }
}

/// (c) One full training step: ResNet-18 (CIFAR stem) + projector [32, 16], two views of 4
/// images, train-mode forward, loss (Gram form on our side: N < D), backward, LARS with both
/// learning rates, non-zero starting momentum and loss_scale 0.5, at a step after warm-up. Run
/// in f64 on both sides so that differences come from the implementations, not rounding.
/// Tolerance 1e-8 relative to each reference tensor's own scale (observed ≤ 4e-13; LARS's trust
/// ratio and small-batch BN backward could amplify f64 rounding ~1e6× at worst, while any
/// formula difference, e.g. a wrong learning rate, decay or trust ratio, shows up at ≥ 1e-4).
#[test]
fn training_step_matches_reference() {
    tch::manual_seed(5);
    let cfg = ModelConfig {
        cifar_stem: true,
        projector: vec![32, 16],
        ..ModelConfig::new(Arch::Resnet18)
    };
    let (_vs, m) = model(&cfg, Kind::Double);
    randomize_bn(&m.state());
    // A large weight decay makes the decay term visible in the updates (the default 1e-6 would
    // change them by ~1e-6 relative, too close to the tolerance to prove the term is there).
    let lars_cfg = LarsConfig {
        loss_scale: 0.5,
        weight_decay: 0.05,
        ..LarsConfig::default()
    };
    let (global_batch, warmup, total, step) = (4usize, 2u64, 10u64, 3u64);
    let mut opt = Lars::new(&m.parameters(), lars_cfg, global_batch, warmup, total);
    let init_mom: HashMap<String, Tensor> = m
        .parameters()
        .iter()
        .map(|p| (p.name.clone(), p.tensor.randn_like() * 0.01))
        .collect();
    opt.load_momentum_buffers(&init_mom).unwrap();

    let dir = tempfile::tempdir().unwrap();
    write_named(&m.state(), &dir.path().join("weights.safetensors"));
    write_named(
        &opt.momentum_buffers(),
        &dir.path().join("momentum.safetensors"),
    );
    let xa = Tensor::randn([4, 3, 16, 16], (Kind::Double, Device::Cpu));
    let xb = Tensor::randn([4, 3, 16, 16], (Kind::Double, Device::Cpu));
    write(
        &[("xa", &xa), ("xb", &xb)],
        &dir.path().join("input.safetensors"),
    );

    let za = m.forward(&xa, true).unwrap();
    let zb = m.forward(&xb, true).unwrap();
    let opts = LossOptions {
        lambda: DEFAULT_LAMBDA,
        form: LossForm::Auto,
        ..LossOptions::default()
    };
    let out = barlow_twins_loss_with(&za, &zb, &opts).unwrap();
    assert_eq!(out.form, LossForm::Gram);
    opt.zero_grad();
    out.loss.backward();
    let (lr_w, lr_b) = opt.learning_rates(step);
    assert!(lr_w > 0.0 && lr_b > 0.0);
    opt.step(step).unwrap();

    let want = run_reference(
        "step",
        dir.path(),
        serde_json::json!({
            "arch": "resnet18", "cifar_stem": true, "projector": [32, 16], "lambda": DEFAULT_LAMBDA,
            "lr_weights": lars_cfg.lr_weights, "lr_biases": lars_cfg.lr_biases,
            "weight_decay": lars_cfg.weight_decay, "momentum": lars_cfg.momentum,
            "eta": lars_cfg.eta, "loss_scale": lars_cfg.loss_scale,
            "global_batch": global_batch, "warmup_steps": warmup, "total_steps": total,
            "step": step,
        }),
    );
    assert_close(
        "loss",
        &out.loss.detach().reshape([1]),
        &want["loss"],
        1e-10,
    );
    // Parameters: compare the updates (after − before), relative to the reference update's size,
    // so that a wrong learning rate, decay or trust ratio cannot hide below the weights' scale.
    // Buffers (BN running statistics, updated twice by the two forwards): compare the values.
    let before: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("weights.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let mut compared = 0;
    for t in m.state() {
        let w = want
            .get(&t.name)
            .unwrap_or_else(|| panic!("reference has no {}", t.name));
        if t.role == TensorRole::Parameter {
            let b = &before[&t.name];
            let ref_delta = w - b;
            assert!(
                ref_delta.abs().max().double_value(&[]) > 0.0,
                "{}: the reference step did not move it",
                t.name
            );
            assert_close(
                &format!("update {}", t.name),
                &(&t.tensor - b),
                &ref_delta,
                1e-8,
            );
        } else {
            assert_close(&t.name, &t.tensor, w, 1e-10);
        }
        compared += 1;
    }
    for t in opt.momentum_buffers() {
        assert_close(
            &format!("momentum {}", t.name),
            &t.tensor,
            &want[&format!("momentum.{}", t.name)],
            1e-8,
        );
        compared += 1;
    }
    // Every tensor the reference returned (besides the loss) was compared.
    assert_eq!(compared, want.len() - 1);
}

/// (e) The GPU settings, bf16 autocast with channels-last weights and input, against PyTorch's
/// own `torch.autocast` on the CPU (same policy machinery, CPU kernels): ResNet-18 backbone in
/// training mode, output and parameter gradients of sum(out·r). With the same thread count both
/// sides run the same ops in the same precision and come out bit-identical here; the tolerance
/// (1e-3 of the tensor's scale, a quarter of one bf16 step 2^-8) leaves room for a different
/// kernel choice on another CPU and nothing more: a cast in a different place moves these
/// tensors by 20-50% (bf16 vs fp32 differ that much through train-mode BN on 4 images, which
/// the test also checks so that it fails if autocast were silently off).
#[test]
fn bf16_autocast_channels_last_matches_torch_autocast() {
    use bt_worker::amp::{autocast_enabled, is_channels_last, with_autocast};
    use bt_worker::amp::{MemoryFormat, Precision};
    tch::set_num_threads(1); // the reference's thread count: the same reduction order
    let (_vs, m, dir) = resnet18_saved(5, true, 1);
    let state: Vec<Tensor> = m.state().into_iter().map(|n| n.tensor).collect();
    MemoryFormat::ChannelsLast.apply_to_weights(&state).unwrap();
    let x = Tensor::randn([4, 3, 16, 16], (Kind::Float, Device::Cpu));
    let r = Tensor::randn([4, 512], (Kind::Float, Device::Cpu));
    write(
        &[("x", &x), ("r", &r)],
        &dir.path().join("input.safetensors"),
    );

    let out = with_autocast(Precision::Bf16, Device::Cpu, || {
        assert!(autocast_enabled(Device::Cpu), "autocast on inside");
        let xin = MemoryFormat::ChannelsLast.apply(&x)?;
        assert!(is_channels_last(&xin));
        m.backbone_forward(&xin, true)
    })
    .unwrap();
    assert!(!autocast_enabled(Device::Cpu), "autocast off again after");
    (out.to_kind(Kind::Float) * &r).sum(Kind::Float).backward();

    let grads = [
        "conv1.weight",
        "bn1.weight",
        "layer1.0.conv1.weight",
        "layer4.1.conv2.weight",
        "layer4.1.bn2.bias",
    ];
    let want = run_reference(
        "amp",
        dir.path(),
        serde_json::json!({"arch": "resnet18", "cifar_stem": true, "grads": grads}),
    );
    assert_close("bf16 output", &out, &want["bf16.out"], 1e-3);
    let params: HashMap<String, Tensor> = m
        .parameters()
        .into_iter()
        .map(|n| (n.name.trim_start_matches("backbone.").to_string(), n.tensor))
        .collect();
    for g in grads {
        let p = &params[g];
        assert_eq!(p.grad().kind(), Kind::Float, "{g}: fp32 master gradient");
        if p.dim() == 4 {
            assert!(is_channels_last(p), "{g}: weight kept channels-last");
        }
        if std::env::var_os("BT_REFERENCE_VERBOSE").is_some() {
            assert_close(
                &format!("(info: fp32 vs bf16 reference) grad {g}"),
                &want[&format!("fp32.grad.{g}")],
                &want[&format!("bf16.grad.{g}")],
                f64::INFINITY,
            );
        }
        assert_close(
            &format!("bf16 grad {g}"),
            &p.grad(),
            &want[&format!("bf16.grad.{g}")],
            1e-3,
        );
    }
    // bf16 really ran: far from the fp32 result (fp32 paths agree to ~1e-7).
    let scale = want["fp32.out"].abs().max().double_value(&[]);
    let gap = (out.to_kind(Kind::Float) - &want["fp32.out"])
        .abs()
        .max()
        .double_value(&[])
        / scale;
    assert!(
        gap > 1e-4,
        "bf16 output too close to fp32 ({gap:e}): autocast off?"
    );
}
