use super::*;
use tch::{Device, Kind};

fn model(arch: Arch, cifar: bool, proj: Vec<i64>) -> (nn::VarStore, BarlowTwinsModel) {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = ModelConfig {
        projector: proj,
        cifar_stem: cifar,
        ..ModelConfig::new(arch)
    };
    let m = BarlowTwinsModel::new(&vs.root(), &cfg).unwrap();
    (vs, m)
}

fn numel(ts: &[NamedTensor]) -> i64 {
    ts.iter().map(|t| t.tensor.numel() as i64).sum()
}

#[test]
fn parameter_counts_match_torchvision_without_fc() {
    // torchvision: resnet18 11,689,512 params, resnet50 25,557,032, minus fc (512·1000+1000,
    // 2048·1000+1000).
    let (_vs, m) = model(Arch::Resnet18, false, vec![16]);
    let bb: Vec<_> = m
        .backbone_state()
        .into_iter()
        .filter(|t| t.role == TensorRole::Parameter)
        .collect();
    assert_eq!(numel(&bb), 11_689_512 - 513_000);
    let (_vs, m) = model(Arch::Resnet34, false, vec![16]);
    let bb: Vec<_> = m
        .backbone_state()
        .into_iter()
        .filter(|t| t.role == TensorRole::Parameter)
        .collect();
    assert_eq!(numel(&bb), 21_797_672 - 513_000);
    let (_vs, m) = model(Arch::Resnet50, false, vec![16]);
    let bb: Vec<_> = m
        .backbone_state()
        .into_iter()
        .filter(|t| t.role == TensorRole::Parameter)
        .collect();
    assert_eq!(numel(&bb), 25_557_032 - 2_049_000);
    // torchvision resnet50 state_dict has 320 entries incl. fc.weight/fc.bias.
    assert_eq!(m.backbone_state().len(), 318);
}

#[test]
fn names_follow_torchvision_and_varstore_agrees() {
    let (vs, m) = model(Arch::Resnet18, true, vec![32, 16]);
    let names: Vec<String> = m.state().into_iter().map(|t| t.name).collect();
    for want in [
        "backbone.conv1.weight",
        "backbone.bn1.running_var",
        "backbone.layer1.0.conv1.weight",
        "backbone.layer2.0.downsample.0.weight",
        "backbone.layer2.0.downsample.1.num_batches_tracked",
        "projector.0.weight",
        "projector.1.weight",
        "projector.1.running_mean",
        "projector.3.weight",
    ] {
        assert!(names.iter().any(|n| n == want), "missing {want}");
    }
    assert!(!names.iter().any(|n| n.starts_with("projector.4")));
    // The VarStore holds exactly the same keys.
    let mut vs_names: Vec<String> = vs.variables().into_keys().collect();
    let mut ours = names.clone();
    vs_names.sort();
    ours.sort();
    assert_eq!(vs_names, ours);
    assert_eq!(
        m.state()
            .iter()
            .find(|t| t.name == "backbone.conv1.weight")
            .unwrap()
            .tensor
            .size(),
        vec![64, 3, 3, 3]
    );
}

#[test]
fn init_follows_torchvision() {
    let (_vs, m) = model(Arch::Resnet18, false, vec![16]);
    let st = m.state();
    let get = |n: &str| {
        st.iter()
            .find(|t| t.name == n)
            .unwrap()
            .tensor
            .shallow_clone()
    };
    // zero_init_residual: last BN γ of every block is 0, the others 1, β 0.
    assert_eq!(
        get("backbone.layer1.0.bn2.weight")
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
    assert_eq!(
        get("backbone.layer1.0.bn1.weight")
            .mean(Kind::Float)
            .double_value(&[]),
        1.0
    );
    assert_eq!(
        get("backbone.layer2.0.downsample.1.weight")
            .mean(Kind::Float)
            .double_value(&[]),
        1.0
    );
    // kaiming normal fan_out: std = sqrt(2 / (out·k·k)); layer4 conv: 512·9.
    let w = get("backbone.layer4.0.conv2.weight");
    let std = w.std(true).double_value(&[]);
    let want = (2.0f64 / (512.0 * 9.0)).sqrt();
    assert!((std / want - 1.0).abs() < 0.01, "std {std} vs {want}");
    let w = get("projector.0.weight");
    let bound = 1.0 / 512f64.sqrt();
    assert!(w.abs().max().double_value(&[]) <= bound);
}

#[test]
fn forward_shapes_and_modes() {
    let (_vs, m) = model(Arch::Resnet18, true, vec![32, 16]);
    let x = Tensor::randn([4, 3, 16, 16], (Kind::Float, Device::Cpu));
    let h = m.backbone_forward(&x, false).unwrap();
    assert_eq!(h.size(), vec![4, 512]);
    let z = m.forward(&x, true).unwrap();
    assert_eq!(z.size(), vec![4, 16]);
    let st = m.state();
    let nbt = st
        .iter()
        .find(|t| t.name == "backbone.bn1.num_batches_tracked")
        .unwrap();
    assert_eq!(nbt.tensor.int64_value(&[]), 1);
    let (_vs, m) = model(Arch::Resnet50, false, vec![8]);
    let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
    assert_eq!(m.backbone_forward(&x, false).unwrap().size(), vec![2, 2048]);
}

#[test]
fn wrong_input_shapes_are_clear_errors() {
    let (_vs, m) = model(Arch::Resnet18, true, vec![16]);
    for (shape, kind) in [
        (vec![2i64, 1, 16, 16], Kind::Float), // one channel
        (vec![2, 4, 16, 16], Kind::Float),    // RGBA
        (vec![3, 16, 16], Kind::Float),       // no batch dimension
        (vec![0, 3, 16, 16], Kind::Float),    // empty batch
        (vec![2, 3, 16, 16], Kind::Uint8),    // not normalized
    ] {
        let x = Tensor::zeros(shape.as_slice(), (kind, Device::Cpu));
        let err = m.forward(&x, true).expect_err("bad input accepted");
        let msg = err.to_string();
        assert!(msg.contains("(N, 3, H, W)"), "{msg}");
        assert!(msg.contains(&format!("{shape:?}")), "{msg}");
    }
}

#[test]
fn backbone_round_trip_and_shape_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bb.safetensors");
    let (_vs, a) = model(Arch::Resnet18, true, vec![16]);
    a.save_backbone_safetensors(&p).unwrap();
    let (_vs2, b) = model(Arch::Resnet18, true, vec![16]);
    b.load_backbone_safetensors(&p).unwrap();
    for (x, y) in a.backbone_state().iter().zip(b.backbone_state().iter()) {
        assert_eq!(x.name, y.name);
        assert!(x.tensor.equal(&y.tensor), "{}", x.name);
    }
    // Full state round trip (projector included).
    let full = dir.path().join("full.safetensors");
    a.save_state_safetensors(&full).unwrap();
    b.load_state_safetensors(&full).unwrap();
    // Into a normal-stem model: conv1 is 7×7 there.
    let (_vs3, c) = model(Arch::Resnet18, false, vec![16]);
    let e = c.load_backbone_safetensors(&p).unwrap_err().to_string();
    assert!(
        e.contains("conv1.weight") && e.contains("[64, 3, 3, 3]") && e.contains("[64, 3, 7, 7]"),
        "{e}"
    );
    // Into ResNet-50: missing keys.
    let (_vs4, d) = model(Arch::Resnet50, true, vec![16]);
    let e = d.load_backbone_safetensors(&p).unwrap_err().to_string();
    assert!(e.contains("missing"), "{e}");
}

#[test]
fn config_deserializes_with_defaults() {
    let c: ModelConfig = serde_json::from_str(r#"{"backbone":"resnet50"}"#).unwrap();
    assert_eq!(c, ModelConfig::new(Arch::Resnet50));
    let c: ModelConfig = toml::from_str(
        "backbone = \"resnet18\"\ncifar_stem = true\nprojector = [2048, 2048]\nsync_bn = false",
    )
    .unwrap();
    assert!(c.cifar_stem && !c.sync_bn && c.projector == vec![2048, 2048]);
    assert!(serde_json::from_str::<ModelConfig>(r#"{"backbone":"resnet101"}"#).is_err());
}

#[test]
fn a_stem_stride_the_stem_would_ignore_is_refused() {
    for (cifar_stem, stem_stride, ok) in [
        (true, 2, true),
        (false, 1, true),
        (false, 2, false),
        (true, 3, false),
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ModelConfig {
            cifar_stem,
            stem_stride,
            width: 8,
            projector: vec![16],
            ..ModelConfig::new(Arch::Resnet18)
        };
        match BarlowTwinsModel::new(&vs.root(), &cfg) {
            Ok(_) => assert!(
                ok,
                "cifar_stem {cifar_stem}, stem_stride {stem_stride} accepted"
            ),
            Err(e) => {
                assert!(!ok, "{e}");
                assert!(e.to_string().contains("model.stem_stride"), "{e}");
            }
        }
    }
}
