//! The kNN monitor as the trainer runs it: a fixed bank (labelled training images) and query set
//! (held-out images), the pretrained backbone scored next to its two baselines (see
//! [`super::baseline`]), with feature extraction shared by every rank of the job.
//!
//! Every rank embeds a contiguous share of the bank and of the queries (BN in eval mode: no
//! collective inside the forward), the shares are all-gathered in rank order, and rank 0 runs the
//! vote. The result equals a single process embedding everything (up to float rounding of
//! different batch sizes), and the ranks finish together instead of the others waiting at a
//! barrier while rank 0 works alone.
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::baseline::{random_init_model, raw_pixels, Baselines, Standardizer};
use super::knn::{extract_features, knn_accuracy, KnnResult};
use crate::data::Source;
use crate::dist::ProcessGroup;
use crate::error::{Error, Result};
use crate::model::BarlowTwinsModel;

/// Images per forward batch while embedding.
const EVAL_BATCH: usize = 256;

/// The protocol's fixed inputs.
pub struct KnnMonitor {
    bank_src: Arc<dyn Source>,
    test_src: Arc<dyn Source>,
    bank: Vec<usize>,
    test: Vec<usize>,
    image_size: usize,
    k: i64,
    temperature: f64,
    num_classes: i64,
    device: Device,
    /// Standardize the networks' features with the bank's statistics before the vote.
    standardize: bool,
    /// Measured once (they do not change while the backbone trains), then repeated in every report
    /// (rank 0 holds the numbers; every rank knows whether they were measured).
    baselines: Option<Baselines>,
    baselines_measured: bool,
}

/// One evaluation: the backbone's result, and the baselines when asked for.
#[derive(Clone, Debug)]
pub struct KnnReport {
    pub trained: KnnResult,
    pub baselines: Option<Baselines>,
    pub bank: usize,
    pub test: usize,
    pub secs: f64,
}

impl KnnMonitor {
    /// The first `bank_size` items of `bank_src` and the first `test_size` of `test_src`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        bank_src: Arc<dyn Source>,
        test_src: Arc<dyn Source>,
        bank_size: usize,
        test_size: usize,
        image_size: usize,
        k: i64,
        temperature: f64,
        device: Device,
    ) -> Result<Self> {
        let num_classes = bank_src.num_classes().ok_or_else(|| {
            Error::Eval(format!(
                "{} has no labels; the kNN monitor needs a labelled dataset",
                bank_src.describe()
            ))
        })? as i64;
        Ok(KnnMonitor {
            bank: (0..bank_src.len().min(bank_size)).collect(),
            test: (0..test_src.len().min(test_size)).collect(),
            bank_src,
            test_src,
            image_size,
            k,
            temperature,
            num_classes,
            device,
            standardize: true,
            baselines: None,
            baselines_measured: false,
        })
    }

    /// Whether the networks' features are standardized with the bank's per-dimension statistics
    /// before the vote (the default, as the raw pixels and the linear probe's inputs are); `false`
    /// votes on the features as they come (L2-normalized only).
    pub fn with_standardize(mut self, on: bool) -> Self {
        self.standardize = on;
        self
    }

    /// Scores `model`'s backbone and, with `baselines`, the two baselines (measured at the first
    /// call that asks, the random-init network drawn from `seed`). Every rank of `group` must call
    /// it with the same arguments; rank 0 gets the report, the others `None`.
    pub fn evaluate(
        &mut self,
        model: &BarlowTwinsModel,
        group: Option<&ProcessGroup>,
        baselines: bool,
        seed: i64,
    ) -> Result<Option<KnnReport>> {
        let t0 = Instant::now();
        let rank0 = group.is_none_or(|g| g.rank() == 0);
        let trained = self.score_backbone(model, group)?;
        if baselines && !self.baselines_measured {
            self.baselines_measured = true;
            let (_vs, fresh) = random_init_model(model.config(), self.device, seed)?;
            if let Some(g) = group {
                // Identical on every rank by construction; the broadcast makes sure of it.
                let state: Vec<Tensor> = fresh.state().into_iter().map(|n| n.tensor).collect();
                g.broadcast_params(&state, 0)?;
            }
            let random_init = self.score_backbone(&fresh, group)?;
            let raw = if rank0 {
                Some(self.score_raw_pixels()?)
            } else {
                None
            };
            if let (Some(r), Some(p)) = (random_init, raw) {
                self.baselines = Some(Baselines {
                    random_init: r.top1,
                    raw_pixels: p.top1,
                });
            }
        }
        Ok(trained.map(|trained| KnnReport {
            trained,
            baselines: if baselines { self.baselines } else { None },
            bank: self.bank.len(),
            test: self.test.len(),
            secs: t0.elapsed().as_secs_f64(),
        }))
    }

    /// The backbone in eval mode: shares embedded on every rank, vote on rank 0.
    fn score_backbone(
        &self,
        model: &BarlowTwinsModel,
        group: Option<&ProcessGroup>,
    ) -> Result<Option<KnnResult>> {
        let f = |x: &Tensor| model.backbone_forward(x, false);
        let (bf, bl) =
            tch::no_grad(|| sharded_features(self.bank_src.as_ref(), &self.bank, self, group, f))?;
        let (qf, ql) =
            tch::no_grad(|| sharded_features(self.test_src.as_ref(), &self.test, self, group, f))?;
        if group.is_some_and(|g| g.rank() != 0) {
            return Ok(None);
        }
        if self.standardize {
            self.vote_standardized(&bf, &bl, &qf, &ql).map(Some)
        } else {
            knn_accuracy(
                &bf,
                &bl,
                &qf,
                &ql,
                self.k,
                self.temperature,
                self.num_classes,
            )
            .map(Some)
        }
    }

    /// The vote on features standardized with the bank's statistics.
    fn vote_standardized(
        &self,
        bf: &Tensor,
        bl: &Tensor,
        qf: &Tensor,
        ql: &Tensor,
    ) -> Result<KnnResult> {
        let s = Standardizer::fit(bf)?;
        knn_accuracy(
            &s.apply(bf)?,
            bl,
            &s.apply(qf)?,
            ql,
            self.k,
            self.temperature,
            self.num_classes,
        )
    }

    /// Raw pixels standardized with the bank's statistics, through the same vote.
    pub fn score_raw_pixels(&self) -> Result<KnnResult> {
        let size = self.image_size;
        let (bf, bl) = extract_features(
            self.bank_src.as_ref(),
            &self.bank,
            size,
            EVAL_BATCH,
            self.device,
            raw_pixels,
        )?;
        let (qf, ql) = extract_features(
            self.test_src.as_ref(),
            &self.test,
            size,
            EVAL_BATCH,
            self.device,
            raw_pixels,
        )?;
        self.vote_standardized(&bf, &bl, &qf, &ql)
    }
}

/// Features of `indices` of `source` through `f`: with a group of W ranks each embeds the r-th of W
/// contiguous shares, and the shares are gathered (in index order) on every rank.
fn sharded_features(
    source: &dyn Source,
    indices: &[usize],
    m: &KnnMonitor,
    group: Option<&ProcessGroup>,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let Some(g) = group.filter(|g| g.world_size() > 1) else {
        return extract_features(source, indices, m.image_size, EVAL_BATCH, m.device, f);
    };
    let (w, r) = (g.world_size(), g.rank());
    let share = indices.len().div_ceil(w);
    let mine = &indices[(r * share).min(indices.len())..((r + 1) * share).min(indices.len())];
    let (feats, labels) = if mine.is_empty() {
        (None, None)
    } else {
        let (x, y) = extract_features(source, mine, m.image_size, EVAL_BATCH, m.device, &f)?;
        (Some(x), Some(y))
    };
    // The feature width, agreed on (a rank with an empty share has none of its own).
    let dim =
        Tensor::from_slice(&[feats.as_ref().map_or(0, |x| x.size()[1])]).to_device(g.device());
    let dims = g.all_gather(&dim)?;
    let d = i64::try_from(dims.max())?;
    // Pad each share to `share` rows; padded (and unreadable, skipped) rows get label −1.
    let n = share as i64;
    let pad_x = Tensor::zeros([n, d], (Kind::Float, g.device()));
    let pad_y = Tensor::full([n], -1i64, (Kind::Int64, g.device()));
    if let (Some(x), Some(y)) = (&feats, &labels) {
        let rows = x.size()[0];
        pad_x.narrow(0, 0, rows).f_copy_(&x.to_device(g.device()))?;
        pad_y
            .narrow(0, 0, rows)
            .f_copy_(&y.to_device(g.device()).to_kind(Kind::Int64))?;
    }
    let all_x = g.all_gather(&pad_x)?;
    let all_y = g.all_gather(&pad_y)?;
    let keep = all_y.ge(0).nonzero().squeeze_dim(1);
    Ok((
        all_x.index_select(0, &keep).to_device(m.device),
        all_y.index_select(0, &keep).to_device(m.device),
    ))
}
