//! The baselines are what they claim to be, on the Fashion-MNIST cut in `tests/data` (512 training,
//! 256 test images):
//! - the raw-pixel kNN baseline equals a direct computation from the IDX bytes (plain f64 loops:
//!   per-pixel standardization with the bank's statistics, cosine similarity, the k nearest voting
//!   with weight exp(sim / T));
//! - the random-init baseline is the kNN of the untrained default-init network (γ = 1 in every
//!   BN, not zero-init residuals), which is what the monitor reports next to the pretrained number,
//!   its features standardized with the bank's statistics as the raw pixels are (or not, with
//!   `with_standardize(false)`).
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bt_worker::data::{IdxSource, Source, Split};
use bt_worker::eval::{
    extract_features, knn_accuracy, random_init_model, KnnMonitor, Standardizer,
};
use bt_worker::model::{Arch, BarlowTwinsModel, ModelConfig};
use tch::{nn, Device};

const K: usize = 20;

/// The tests of this file draw from libtorch's global generator: one at a time.
static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
const T: f64 = 0.1;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-cut")
}

/// The payload of an IDX file (gzipped or not) after its header.
fn idx_payload(dir: &Path, name: &str) -> Vec<u8> {
    let plain = dir.join(name);
    let mut raw = Vec::new();
    if plain.exists() {
        raw = std::fs::read(&plain).unwrap();
    } else {
        let gz = std::fs::File::open(dir.join(format!("{name}.gz"))).unwrap();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .unwrap();
    }
    let ndims = raw[3] as usize;
    raw[4 + 4 * ndims..].to_vec()
}

fn images(dir: &Path, name: &str) -> Vec<Vec<f64>> {
    idx_payload(dir, name)
        .chunks(28 * 28)
        .map(|c| c.iter().map(|&v| f64::from(v) / 255.0).collect())
        .collect()
}

fn labels(dir: &Path, name: &str) -> Vec<usize> {
    idx_payload(dir, name)
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

/// kNN top-1 on standardized raw pixels, from scratch.
fn direct_raw_pixel_knn(
    bank: &[Vec<f64>],
    bank_labels: &[usize],
    query: &[Vec<f64>],
    query_labels: &[usize],
) -> f64 {
    let d = bank[0].len();
    let n = bank.len() as f64;
    let mean: Vec<f64> = (0..d)
        .map(|j| bank.iter().map(|x| x[j]).sum::<f64>() / n)
        .collect();
    let std: Vec<f64> = (0..d)
        .map(|j| (bank.iter().map(|x| (x[j] - mean[j]).powi(2)).sum::<f64>() / n).sqrt())
        .collect();
    let unit = |x: &Vec<f64>| -> Vec<f64> {
        let z: Vec<f64> = (0..d)
            .map(|j| {
                // A pixel constant on the bank carries nothing.
                if std[j] > 1e-6 {
                    (x[j] - mean[j]) / std[j]
                } else {
                    0.0
                }
            })
            .collect();
        let norm = z.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        z.into_iter().map(|v| v / norm).collect()
    };
    let b: Vec<Vec<f64>> = bank.iter().map(unit).collect();
    let mut hits = 0;
    for (q, &truth) in query.iter().zip(query_labels) {
        let q = unit(q);
        let mut sims: Vec<(f64, usize)> = b
            .iter()
            .zip(bank_labels)
            .map(|(x, &l)| (x.iter().zip(&q).map(|(a, b)| a * b).sum(), l))
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut votes = [0f64; 10];
        for &(s, l) in &sims[..K] {
            votes[l] += (s / T).exp();
        }
        let pred = (0..10)
            .max_by(|&a, &b| votes[a].total_cmp(&votes[b]))
            .unwrap();
        hits += usize::from(pred == truth);
    }
    hits as f64 / query.len() as f64
}

#[test]
fn baselines_are_what_they_claim() {
    let _one_at_a_time = SEED_LOCK.lock().unwrap();
    let dir = fixture();
    let bank_src: Arc<dyn Source> = Arc::new(IdxSource::open_dir(&dir, Split::Train).unwrap());
    let test_src: Arc<dyn Source> = Arc::new(IdxSource::open_dir(&dir, Split::Test).unwrap());
    let (nb, nq) = (bank_src.len(), test_src.len());
    assert_eq!((nb, nq), (512, 256));
    let mut monitor = KnnMonitor::new(
        bank_src.clone(),
        test_src.clone(),
        nb,
        nq,
        28,
        K as i64,
        T,
        Device::Cpu,
    )
    .unwrap();

    // Raw pixels: the monitor's number is the direct computation's.
    let direct = direct_raw_pixel_knn(
        &images(&dir, "train-images-idx3-ubyte"),
        &labels(&dir, "train-labels-idx1-ubyte"),
        &images(&dir, "t10k-images-idx3-ubyte"),
        &labels(&dir, "t10k-labels-idx1-ubyte"),
    );
    let raw = monitor.score_raw_pixels().unwrap();
    assert_eq!(raw.n, nq);
    assert_eq!(
        (raw.top1 * nq as f64).round(),
        (direct * nq as f64).round(),
        "monitor {} vs direct {direct}",
        raw.top1
    );
    assert!(
        direct > 0.5,
        "raw pixels should be far above chance: {direct}"
    );

    // The monitor's report: the pretraining-init network (zero-init residuals) is what it scores
    // as "trained" here; the random-init baseline is the default-init network of the same seed.
    let cfg = ModelConfig {
        cifar_stem: true,
        width: 8,
        projector: vec![16],
        ..ModelConfig::new(Arch::Resnet18)
    };
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let zero_init = BarlowTwinsModel::new(&vs.root(), &cfg).unwrap();
    let report = monitor
        .evaluate(&zero_init, None, true, 5)
        .unwrap()
        .expect("a single process reports");
    let b = report.baselines.expect("baselines were asked for");
    assert_eq!(b.raw_pixels, raw.top1);
    let (_vs, fresh) = random_init_model(&cfg, Device::Cpu, 5).unwrap();
    assert!(!fresh.config().zero_init_residual);
    let f = |x: &tch::Tensor| fresh.backbone_forward(x, false);
    let idx = |n: usize| (0..n).collect::<Vec<_>>();
    let (bf, bl) = extract_features(bank_src.as_ref(), &idx(nb), 28, 100, Device::Cpu, f).unwrap();
    let (qf, ql) = extract_features(test_src.as_ref(), &idx(nq), 28, 100, Device::Cpu, f).unwrap();
    // By default the monitor standardizes the network's features with the bank's statistics (as
    // the raw pixels are) before the vote.
    let s = Standardizer::fit(&bf).unwrap();
    let (sbf, sqf) = (s.apply(&bf).unwrap(), s.apply(&qf).unwrap());
    let want = knn_accuracy(&sbf, &bl, &sqf, &ql, K as i64, T, 10).unwrap();
    assert_eq!(b.random_init, want.top1);
    let plain = knn_accuracy(&bf, &bl, &qf, &ql, K as i64, T, 10).unwrap();
    assert_ne!(
        want.top1, plain.top1,
        "standardizing changes the vote on this fixture"
    );
    // The zero-init network is not the default-init one: the scores differ.
    assert_ne!(report.trained.top1, b.random_init);
    // Measured once, repeated in later reports.
    let again = monitor
        .evaluate(&zero_init, None, true, 99)
        .unwrap()
        .unwrap();
    assert_eq!(again.baselines, Some(b));
    assert_eq!(again.trained.top1, report.trained.top1);

    // `eval.knn_standardize = false`: the plain protocol (L2-normalized features only) for the
    // networks; the raw-pixel baseline stays standardized.
    let mut plain_monitor =
        KnnMonitor::new(bank_src, test_src, nb, nq, 28, K as i64, T, Device::Cpu)
            .unwrap()
            .with_standardize(false);
    let r = plain_monitor
        .evaluate(&zero_init, None, true, 5)
        .unwrap()
        .unwrap();
    let b = r.baselines.unwrap();
    assert_eq!(b.random_init, plain.top1);
    assert_eq!(b.raw_pixels, raw.top1);
}

/// The random-init baseline is the default init: every BN γ starts at 1 (zero-init residuals would
/// leave the last BN of each block at 0), the convolutions are kaiming-normal (fan-out), the same
/// seed gives the same network, and the pretraining config, which keeps zero-init residuals,
/// still builds the zero-init variant.
#[test]
fn random_init_baseline_uses_the_default_init() {
    use bt_worker::model::TensorRole;
    use tch::Kind;
    let cfg = ModelConfig {
        cifar_stem: true,
        projector: vec![16],
        width: 16,
        ..ModelConfig::new(Arch::Resnet18)
    };
    assert!(
        cfg.zero_init_residual,
        "pretraining keeps zero-init residuals"
    );
    let _one_at_a_time = SEED_LOCK.lock().unwrap();
    let (_vs, m) = random_init_model(&cfg, Device::Cpu, 7).unwrap();
    assert!(!m.config().zero_init_residual);
    assert_eq!(m.config().width, 16);
    let st = m.backbone_state();
    let last_bns = st
        .iter()
        .filter(|t| t.role == TensorRole::Parameter && t.name.ends_with("bn2.weight"))
        .count();
    assert_eq!(last_bns, 8, "ResNet-18 has 8 basic blocks");
    for t in st
        .iter()
        .filter(|t| t.name.contains("bn") && t.name.ends_with(".weight"))
    {
        let (lo, hi) = (
            t.tensor.min().double_value(&[]),
            t.tensor.max().double_value(&[]),
        );
        assert_eq!(
            (lo, hi),
            (1.0, 1.0),
            "{} starts at γ in [{lo}, {hi}]",
            t.name
        );
    }
    let w = |m: &BarlowTwinsModel| {
        m.backbone_state()
            .into_iter()
            .find(|t| t.name == "layer3.1.conv2.weight")
            .unwrap()
            .tensor
    };
    let std = w(&m).std(true).double_value(&[]);
    let want = (2.0f64 / (64.0 * 9.0)).sqrt(); // fan-out: 4·16 channels × 3×3
    assert!((std / want - 1.0).abs() < 0.05, "std {std} vs {want}");
    let (_vs2, again) = random_init_model(&cfg, Device::Cpu, 7).unwrap();
    assert!(w(&m).equal(&w(&again)), "same seed, same network");
    let vs = nn::VarStore::new(Device::Cpu);
    let pretrain = BarlowTwinsModel::new(&vs.root(), &cfg).unwrap();
    let g = pretrain
        .backbone_state()
        .into_iter()
        .find(|t| t.name == "layer1.0.bn2.weight")
        .unwrap();
    assert_eq!(g.tensor.abs().sum(Kind::Float).double_value(&[]), 0.0);
}
