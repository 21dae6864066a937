//! The kNN monitor shared by the ranks: each embeds its share of bank and queries, rank 0 votes;
//! the result is the single-process one (on the fixture cut of Fashion-MNIST, uneven shares).
use std::path::PathBuf;
use std::sync::Arc;

use bt_worker::data::{IdxSource, Source, Split};
use bt_worker::eval::KnnMonitor;
use bt_worker::model::{Arch, BarlowTwinsModel, ModelConfig};
use tch::{nn, Device, Tensor};

use crate::harness::{all_ok, run_ranks, TIMEOUT};

fn monitor() -> KnnMonitor {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-cut");
    let bank: Arc<dyn Source> = Arc::new(IdxSource::open_dir(&dir, Split::Train).unwrap());
    let test: Arc<dyn Source> = Arc::new(IdxSource::open_dir(&dir, Split::Test).unwrap());
    // 301 bank and 199 query images: shares of 151 + 150 and 100 + 99.
    KnnMonitor::new(bank, test, 301, 199, 28, 10, 0.1, Device::Cpu).unwrap()
}

fn cfg() -> ModelConfig {
    ModelConfig {
        cifar_stem: true,
        width: 8,
        projector: vec![16],
        zero_init_residual: false,
        ..ModelConfig::new(Arch::Resnet18)
    }
}

#[test]
fn sharded_knn_monitor_equals_one_process() {
    let results = all_ok(run_ranks(2, TIMEOUT, |g| {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = BarlowTwinsModel::new(&vs.root(), &cfg())?;
        // Rank 0's weights everywhere (threads share libtorch's generator).
        let state: Vec<Tensor> = model.state().into_iter().map(|n| n.tensor).collect();
        g.broadcast_params(&state, 0)?;
        let report = monitor().evaluate(&model, Some(&g), true, 3)?;
        let weights: Vec<Tensor> = state.iter().map(|t| t.copy()).collect();
        Ok((report, weights))
    }));
    assert!(results[1].0.is_none(), "only rank 0 reports");
    let (report, weights) = (results[0].0.clone().expect("rank 0 reports"), &results[0].1);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = BarlowTwinsModel::new(&vs.root(), &cfg()).unwrap();
    tch::no_grad(|| {
        for (d, s) in model.state().iter().zip(weights) {
            d.tensor.shallow_clone().copy_(s);
        }
    });
    let single = monitor().evaluate(&model, None, true, 3).unwrap().unwrap();
    assert_eq!((report.bank, report.test), (301, 199));
    assert_eq!(report.trained.n, 199);
    assert!(
        (report.trained.top1 - single.trained.top1).abs() <= 1.0 / 199.0 + 1e-9,
        "2 ranks {} vs 1 process {}",
        report.trained.top1,
        single.trained.top1
    );
    let (b2, b1) = (report.baselines.unwrap(), single.baselines.unwrap());
    assert_eq!(b2.raw_pixels, b1.raw_pixels);
    assert!(
        b2.random_init > 0.3,
        "random-init baseline {}",
        b2.random_init
    );
}
