//! The linear-probe job (`kind = "linear_probe"`): a frozen backbone from a committed checkpoint in
//! eval mode, features computed once and kept in memory, then a linear classifier trained with SGD
//! (momentum 0.9, cosine learning rate, weight decay 1e-6), reporting top-1/top-5 each epoch and the
//! best. Its baselines (`eval.baseline`): the same probe on an untrained backbone of the same
//! architecture with the default init, and on the raw pixels (see `eval::baseline`).
use std::path::Path;
use std::time::Instant;

use bt_common::JobSpec;
use bt_proto::trainer_event::Body;
use bt_proto::EvalResult;
use tch::nn;
use tch::{Device, Kind, Tensor};
use tracing::info;

use super::{limited, source_spec, stop_requested, Outcome, Reporter, TResult};
use crate::data::{self, Split};
use crate::model::BarlowTwinsModel;
use crate::{checkpoint, eval, Error};

/// Probe settings (BARLOW_TWINS.md: lr 0.3 with cosine decay, momentum 0.9, wd 1e-6, batch 256).
const LR: f64 = 0.3;
const BATCH: i64 = 256;
const WEIGHT_DECAY: f64 = 1e-6;
const MOMENTUM: f64 = 0.9;

pub struct ProbeResult {
    pub best_top1: f64,
    pub best_top5: f64,
}

pub fn run(spec: &JobSpec, device: Device, rep: &mut Reporter) -> TResult<Outcome> {
    let ck = Path::new(&spec.eval.checkpoint);
    // Refuse a missing or corrupt checkpoint before any device time is spent.
    let meta = checkpoint::verify(ck)?;
    let src_spec = source_spec(spec);
    let train_src = limited(data::open_source(&src_spec, Split::Train)?, spec.data.limit);
    let test_src = data::open_source(&src_spec, Split::Test)?;
    let classes = train_src.num_classes().ok_or_else(|| Error::Data {
        path: spec.data.path.clone().into(),
        message: "the linear probe needs a labelled data set".into(),
    })? as i64;
    let image_size = JobSpec::from_toml_str(&meta.config_text)
        .map(|s| s.data.image_size)
        .unwrap_or(spec.data.image_size) as usize;
    let train_idx: Vec<usize> = (0..train_src.len()).collect();
    let test_idx: Vec<usize> = (0..test_src.len().min(spec.eval.test_size as usize)).collect();
    info!(checkpoint = %ck.display(), step = meta.step, train = train_idx.len(), test = test_idx.len(), "linear probe");

    let features = |model: &BarlowTwinsModel| -> TResult<(Tensor, Tensor, Tensor, Tensor)> {
        let f = |x: &Tensor| model.backbone_forward(x, false);
        let (xtr, ytr) =
            eval::extract_features(train_src.as_ref(), &train_idx, image_size, 256, device, f)?;
        let (xte, yte) =
            eval::extract_features(test_src.as_ref(), &test_idx, image_size, 256, device, f)?;
        Ok((xtr, ytr, xte, yte))
    };
    let t0 = Instant::now();
    let vs = nn::VarStore::new(device);
    let model = BarlowTwinsModel::new(&vs.root(), &meta.model_config)?;
    checkpoint::load_model(ck, &model)?;
    let (xtr, ytr, xte, yte) = features(&model)?;
    info!(
        secs = t0.elapsed().as_secs_f64(),
        dim = xtr.size()[1],
        "features cached"
    );
    let trained = train_probe(
        rep,
        &xtr,
        &ytr,
        &xte,
        &yte,
        classes,
        spec,
        meta.step,
        "linear_probe",
    )?;
    let baselines = if spec.eval.baseline {
        // The same architecture with its default init (not zero-init residuals), untrained.
        let (_vs0, fresh) =
            eval::random_init_model(&meta.model_config, device, spec.train.seed as i64 + 1)?;
        let (btr, bytr, bte, byte) = features(&fresh)?;
        let random_init = train_probe(
            rep,
            &btr,
            &bytr,
            &bte,
            &byte,
            classes,
            spec,
            meta.step,
            "linear_probe_baseline",
        )?;
        drop((btr, bte));
        // Raw pixels: the evaluation transform's output, flattened (standardized by the probe).
        let px = |x: &Tensor| eval::raw_pixels(x);
        let (ptr, pytr) =
            eval::extract_features(train_src.as_ref(), &train_idx, image_size, 256, device, px)?;
        let (pte, pyte) =
            eval::extract_features(test_src.as_ref(), &test_idx, image_size, 256, device, px)?;
        let raw = train_probe(
            rep,
            &ptr,
            &pytr,
            &pte,
            &pyte,
            classes,
            spec,
            meta.step,
            "linear_probe_raw_pixels",
        )?;
        Some(eval::Baselines {
            random_init: random_init.best_top1,
            raw_pixels: raw.best_top1,
        })
    } else {
        None
    };
    let mut ev = EvalResult {
        step: meta.step,
        epoch: meta.epoch,
        kind: "linear_probe".into(),
        top1: trained.best_top1,
        top5: trained.best_top5,
        detail: format!(
            "best of {} epochs; checkpoint {} (step {}); {} train / {} test images",
            spec.eval.probe_epochs,
            ck.display(),
            meta.step,
            train_idx.len(),
            test_idx.len()
        ),
        ..Default::default()
    };
    if let Some(b) = baselines {
        info!(
            top1 = trained.best_top1,
            random_init = b.random_init,
            raw_pixels = b.raw_pixels,
            margin = b.margin(trained.best_top1),
            "linear probe"
        );
        b.fill(&mut ev);
    }
    rep.send(Body::Eval(ev));
    Ok(if stop_requested() {
        Outcome::Stopped
    } else {
        Outcome::Finished
    })
}

/// Trains a linear layer on cached features; reports each epoch as an eval event of `kind`.
#[allow(clippy::too_many_arguments)]
pub fn train_probe(
    rep: &mut Reporter,
    xtr: &Tensor,
    ytr: &Tensor,
    xte: &Tensor,
    yte: &Tensor,
    classes: i64,
    spec: &JobSpec,
    ck_step: u64,
    kind: &str,
) -> TResult<ProbeResult> {
    let device = xtr.device();
    // Standardize each feature with the training set's statistics (an affine-free batch norm in
    // front of the linear layer, frozen): the raw scale of a frozen backbone's features varies by
    // orders of magnitude between checkpoints, and a fixed learning rate should suit them all.
    // Features constant on the training split are dropped (see `Standardizer`).
    let standardize = eval::Standardizer::fit(xtr)?;
    let xtr = &standardize.apply(xtr)?;
    let xte = &standardize.apply(xte)?;
    let n = xtr.size()[0];
    let d = xtr.size()[1];
    let epochs = spec.eval.probe_epochs.max(1) as usize;
    let mut lin = Probe::new(device, d, classes)?;
    let steps_per_epoch = (n + BATCH - 1) / BATCH;
    let total = (epochs as i64 * steps_per_epoch) as f64;
    let mut best = ProbeResult {
        best_top1: 0.0,
        best_top5: 0.0,
    };
    let mut step = 0f64;
    for epoch in 0..epochs {
        if stop_requested() {
            break;
        }
        let perm = Tensor::f_randperm(n, (Kind::Int64, device))?;
        let mut loss_sum = 0.0;
        for s in 0..steps_per_epoch {
            let idx = perm.f_narrow(0, s * BATCH, BATCH.min(n - s * BATCH))?;
            let x = xtr.f_index_select(0, &idx)?;
            let y = ytr.f_index_select(0, &idx)?;
            let lr = LR * 0.5 * (1.0 + (std::f64::consts::PI * step / total).cos());
            let loss = lin
                .forward(&x)?
                .f_log_softmax(-1, Kind::Float)?
                .f_nll_loss::<Tensor>(&y, None, tch::Reduction::Mean, -100)?;
            lin.backward_step(&loss, lr)?;
            loss_sum += loss.f_double_value(&[])?;
            step += 1.0;
        }
        let (top1, top5) = {
            let _no_grad = tch::no_grad_guard();
            accuracy(&lin.forward(xte)?, yte)?
        };
        if top1 > best.best_top1 {
            best.best_top1 = top1;
        }
        best.best_top5 = best.best_top5.max(top5);
        let mean_loss = loss_sum / steps_per_epoch as f64;
        info!(kind, epoch, loss = mean_loss, top1, top5, "probe epoch");
        rep.send(Body::Eval(EvalResult {
            step: ck_step,
            epoch: epoch as u32 + 1,
            kind: format!("{kind}_epoch"),
            top1,
            top5,
            detail: format!("epoch {}/{epochs} train loss {mean_loss:.4}", epoch + 1),
            ..Default::default()
        }));
    }
    Ok(best)
}

/// The probe's linear classifier (weights N(0, 0.01²), zero bias) and its SGD (momentum 0.9,
/// no dampening, weight decay [`WEIGHT_DECAY`], PyTorch's update rule), every libtorch call
/// fallible.
struct Probe {
    _vs: nn::VarStore,
    ws: Tensor,
    bs: Tensor,
    /// Momentum buffers of `ws` and `bs`, from the first step on.
    momentum: Option<(Tensor, Tensor)>,
}

impl Probe {
    fn new(device: Device, d: i64, classes: i64) -> TResult<Self> {
        let vs = nn::VarStore::new(device);
        let root = vs.root() / "fc";
        let bs = root.f_var("bias", &[classes], nn::Init::Const(0.0))?;
        let ws = root.f_var(
            "weight",
            &[classes, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        )?;
        Ok(Probe {
            _vs: vs,
            ws,
            bs,
            momentum: None,
        })
    }

    fn forward(&self, x: &Tensor) -> TResult<Tensor> {
        Ok(x.f_linear(&self.ws, Some(&self.bs))?)
    }

    /// Zeroes the gradients, back-propagates `loss`, and takes one SGD step at `lr`.
    fn backward_step(&mut self, loss: &Tensor, lr: f64) -> TResult<()> {
        for p in [&mut self.ws, &mut self.bs] {
            let mut g = p.f_grad()?;
            if g.defined() {
                let _ = g.f_zero_()?;
            }
        }
        loss.f_backward()?;
        let _no_grad = tch::no_grad_guard();
        let mut d = Vec::with_capacity(2);
        for p in [&self.ws, &self.bs] {
            // d_p = grad + weight_decay · p
            d.push(p.f_grad()?.f_add(&p.f_mul_scalar(WEIGHT_DECAY)?)?);
        }
        let bufs = match self.momentum.take() {
            None => (d[0].f_detach_copy()?, d[1].f_detach_copy()?),
            Some((mut bw, mut bb)) => {
                for (b, g) in [(&mut bw, &d[0]), (&mut bb, &d[1])] {
                    let _ = b.f_mul_scalar_(MOMENTUM)?.f_add_(g)?;
                }
                (bw, bb)
            }
        };
        let _ = self.ws.f_sub_(&bufs.0.f_mul_scalar(lr)?)?;
        let _ = self.bs.f_sub_(&bufs.1.f_mul_scalar(lr)?)?;
        self.momentum = Some(bufs);
        Ok(())
    }
}

/// Top-1 and top-5 accuracy of `logits` against `labels`.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> TResult<(f64, f64)> {
    let n = labels.size()[0].max(1) as f64;
    let k = logits.size()[1].min(5);
    let top = logits.f_topk(k, 1, true, true)?.1;
    let hit = top.f_eq_tensor(&labels.f_unsqueeze(1)?)?;
    let top1 = hit
        .f_narrow(1, 0, 1)?
        .f_sum(Kind::Float)?
        .f_double_value(&[])?
        / n;
    let top5 = hit
        .f_any_dim(1, false)?
        .f_sum(Kind::Float)?
        .f_double_value(&[])?
        / n;
    Ok((top1, top5))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On separable data the probe's loss falls and its accuracy is far above chance.
    #[test]
    fn probe_learns_separable_features() {
        tch::manual_seed(0);
        let classes = 4;
        let centers = Tensor::randn([classes, 16], (Kind::Float, Device::Cpu)) * 3.0;
        let make = |n: i64| {
            let y = Tensor::randint(classes, [n], (Kind::Int64, Device::Cpu));
            let x =
                centers.index_select(0, &y) + Tensor::randn([n, 16], (Kind::Float, Device::Cpu));
            (x, y)
        };
        let (xtr, ytr) = make(512);
        let (xte, yte) = make(256);
        let mut spec = JobSpec::default();
        spec.eval.probe_epochs = 5;
        let mut rep = Reporter::collecting();
        let r = train_probe(&mut rep, &xtr, &ytr, &xte, &yte, classes, &spec, 0, "t").unwrap();
        assert!(r.best_top1 > 0.9, "top-1 {}", r.best_top1);
        assert_eq!(rep.collected.len(), 5);
        let (t1, t5) = accuracy(
            &Tensor::from_slice2(&[[1.0f32, 0.0, 0.5], [0.0, 1.0, 0.2]]),
            &Tensor::from_slice(&[2i64, 1]),
        )
        .unwrap();
        assert_eq!((t1, t5), (0.5, 1.0));
    }
}
