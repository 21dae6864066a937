//! kNN monitor (../shared/design/BARLOW_TWINS.md, "Evaluation protocols"): the L2-normalized
//! features of a labelled bank vote for each query with the k most cosine-similar bank items,
//! each weighted by `exp(sim / T)` (k = 200, T = 0.1 in the usual setting).

use tch::{Device, Kind, Tensor};

use crate::data::{eval_batches, EvalTransform, Source};
use crate::error::{Error, Result};

/// Accuracy of a kNN evaluation, as fractions in [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KnnResult {
    pub top1: f64,
    /// Top-5 (top-`num_classes` when there are fewer than 5 classes).
    pub top5: f64,
    /// Number of queries.
    pub n: usize,
}

/// Bytes of similarity matrix per query chunk.
const CHUNK_BYTES: i64 = 256 << 20;

fn l2_normalize(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    let norm = x
        .norm_scalaropt_dim(2.0, [1i64].as_slice(), true)
        .clamp_min(1e-12);
    x / norm
}

fn check_labels(name: &str, labels: &Tensor, n: i64, num_classes: i64) -> Result<()> {
    let size = labels.size();
    if size != [n] {
        return Err(Error::Eval(format!(
            "{name}: labels of shape {size:?}, expected [{n}] (one label per feature row)"
        )));
    }
    if !matches!(
        labels.kind(),
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
    ) {
        return Err(Error::Eval(format!(
            "{name}: labels must be integers, got {:?}",
            labels.kind()
        )));
    }
    if n > 0 {
        let lo = i64::try_from(labels.min())?;
        let hi = i64::try_from(labels.max())?;
        if lo < 0 || hi >= num_classes {
            return Err(Error::Eval(format!(
                "{name}: labels span [{lo}, {hi}], outside [0, {num_classes}) classes"
            )));
        }
    }
    Ok(())
}

/// Weighted kNN class scores: for each query row, the `k` most cosine-similar `bank` rows vote for
/// their label with weight `exp(sim / temperature)`. Returns f32 scores `[m, num_classes]` on the
/// bank's device (predictions are `scores.argmax(1)`).
///
/// `bank`: [n, d] features; `bank_labels`: [n] integer labels in `[0, num_classes)`; `query`:
/// [m, d]. Features need not be normalized (they are L2-normalized here). Queries are processed in
/// chunks so that the similarity block stays under 256 MiB.
pub fn knn_classify(
    bank: &Tensor,
    bank_labels: &Tensor,
    query: &Tensor,
    k: i64,
    temperature: f64,
    num_classes: i64,
) -> Result<Tensor> {
    let (bs, qs) = (bank.size(), query.size());
    if bs.len() != 2 || qs.len() != 2 || bs[1] != qs[1] {
        return Err(Error::Eval(format!(
            "feature shapes bank {bs:?} and query {qs:?}: expected [n, d] and [m, d]"
        )));
    }
    let (n, m) = (bs[0], qs[0]);
    if k < 1 {
        return Err(Error::Eval(format!("k = {k} must be at least 1")));
    }
    if n < k {
        return Err(Error::Eval(format!(
            "the bank holds {n} features, fewer than k = {k}; use a larger bank or a smaller k"
        )));
    }
    if temperature <= 0.0 || !temperature.is_finite() {
        return Err(Error::Eval(format!(
            "temperature {temperature} must be positive"
        )));
    }
    if num_classes < 1 {
        return Err(Error::Eval(format!(
            "num_classes {num_classes} must be positive"
        )));
    }
    check_labels("bank", bank_labels, n, num_classes)?;
    let device = bank.device();
    let bank_n = l2_normalize(bank);
    let bank_t = bank_n.tr();
    let labels = bank_labels.to_device(device).to_kind(Kind::Int64);
    let query_n = l2_normalize(&query.to_device(device));
    let chunk = (CHUNK_BYTES / (4 * n.max(1))).clamp(1, m.max(1));
    let mut out = Vec::new();
    let mut start = 0;
    while start < m {
        let len = chunk.min(m - start);
        let q = query_n.narrow(0, start, len);
        let sim = q.matmul(&bank_t); // [c, n]
        let (vals, idx) = sim.topk(k, 1, true, true);
        let lab = labels.index_select(0, &idx.flatten(0, -1)).view([len, k]);
        let w = (vals / temperature).exp();
        let scores = Tensor::zeros([len, num_classes], (Kind::Float, device));
        out.push(scores.scatter_add(1, &lab, &w));
        start += len;
    }
    if out.is_empty() {
        return Ok(Tensor::zeros([0, num_classes], (Kind::Float, device)));
    }
    Ok(Tensor::cat(&out, 0))
}

/// Top-1 / top-5 accuracy of [`knn_classify`] on labelled queries.
pub fn knn_accuracy(
    bank: &Tensor,
    bank_labels: &Tensor,
    query: &Tensor,
    query_labels: &Tensor,
    k: i64,
    temperature: f64,
    num_classes: i64,
) -> Result<KnnResult> {
    let m = query.size().first().copied().unwrap_or(0);
    check_labels("query", query_labels, m, num_classes)?;
    if m == 0 {
        return Err(Error::Eval("no query features to evaluate".into()));
    }
    let scores = knn_classify(bank, bank_labels, query, k, temperature, num_classes)?;
    let truth = query_labels
        .to_device(scores.device())
        .to_kind(Kind::Int64)
        .unsqueeze(1);
    let k5 = num_classes.min(5);
    let (_, pred) = scores.topk(k5, 1, true, true);
    let hits = pred.eq_tensor(&truth).to_kind(Kind::Float); // [m, k5]
    let top1 = f64::try_from(hits.narrow(1, 0, 1).mean(Kind::Float))?;
    let top5 = f64::try_from(
        hits.sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
            .mean(Kind::Float),
    )?;
    Ok(KnnResult {
        top1,
        top5,
        n: m as usize,
    })
}

/// Features and labels of `indices` of `source`: each image goes through the evaluation transform
/// for `image_size` ([`EvalTransform::for_size`]: resize + center crop + ImageNet normalization),
/// in batches of `batch` on `device`, then through `f` (for example the backbone in eval mode);
/// gradients are off. Returns f32 features `[n, d]` (flattened) and i64 labels `[n]`, both on
/// `device`, in index order. Unreadable images are skipped (see [`eval_batches`]); a source without
/// labels is an error.
pub fn extract_features(
    source: &dyn Source,
    indices: &[usize],
    image_size: usize,
    batch: usize,
    device: Device,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    if source.num_classes().is_none() {
        return Err(Error::Eval(format!(
            "{} has no labels; the kNN monitor needs a labelled dataset",
            source.describe()
        )));
    }
    let _no_grad = tch::no_grad_guard();
    let mut feats = Vec::new();
    let mut labels = Vec::new();
    for b in eval_batches(source, indices, EvalTransform::for_size(image_size), batch) {
        let b = b?;
        if b.is_empty() {
            continue;
        }
        let l = b.labels.as_ref().ok_or_else(|| {
            Error::Eval(format!(
                "an item of {} in {:?}.. has no label",
                source.describe(),
                b.indices.first()
            ))
        })?;
        let y = f(&b.normalized(device)?)?;
        if y.size().first() != Some(&(b.len() as i64)) {
            return Err(Error::Eval(format!(
                "feature function returned shape {:?} for a batch of {}",
                y.size(),
                b.len()
            )));
        }
        feats.push(y.f_flatten(1, -1)?.f_to_kind(Kind::Float)?);
        labels.push(l.f_to_device(device)?);
    }
    if feats.is_empty() {
        return Err(Error::Eval(format!(
            "no readable image among {} indices of {}",
            indices.len(),
            source.describe()
        )));
    }
    Ok((Tensor::f_cat(&feats, 0)?, Tensor::f_cat(&labels, 0)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{IdxSource, SyntheticSource};

    /// `n` points per class around well-separated random centres in `d` dimensions.
    fn clusters(classes: i64, n: i64, d: i64, spread: f64, seed: i64) -> (Tensor, Tensor) {
        tch::manual_seed(seed);
        let centres = Tensor::randn([classes, d], (Kind::Float, Device::Cpu)) * 4.0;
        let labels = Tensor::arange(classes, (Kind::Int64, Device::Cpu)).repeat([n]);
        let x = centres.index_select(0, &labels)
            + Tensor::randn([classes * n, d], (Kind::Float, Device::Cpu)) * spread;
        (x, labels)
    }

    #[test]
    fn separated_clusters_are_classified_perfectly() {
        let (bank, bl) = clusters(10, 50, 32, 1.0, 1);
        let (query, ql) = clusters(10, 20, 32, 1.0, 1); // same centres (same seed), new draws
        let (q2, _) = {
            tch::manual_seed(99);
            let noise = Tensor::randn(query.size(), (Kind::Float, Device::Cpu));
            (&query + noise * 0.5, ())
        };
        let r = knn_accuracy(&bank, &bl, &q2, &ql, 20, 0.1, 10).unwrap();
        assert!(r.top1 > 0.99, "{r:?}");
        assert!(r.top5 >= r.top1);
        assert_eq!(r.n, 200);
    }

    #[test]
    fn shuffled_labels_give_chance() {
        let (bank, bl) = clusters(10, 100, 32, 1.0, 2);
        let (query, ql) = clusters(10, 50, 32, 1.0, 2);
        tch::manual_seed(5);
        let perm = Tensor::randperm(bl.size()[0], (Kind::Int64, Device::Cpu));
        let shuffled = bl.index_select(0, &perm);
        let r = knn_accuracy(&bank, &shuffled, &query, &ql, 50, 0.1, 10).unwrap();
        assert!(r.top1 < 0.2, "{r:?}"); // chance is 0.1; 500 queries
        assert!(r.top5 < 0.7, "{r:?}"); // chance is 0.5
    }

    #[test]
    fn weights_are_exp_sim_over_t() {
        // Query e0; neighbours e0 (sim 1, class 0), (1, 0.1) (sim cos≈0.995, class 1), e1 (class 1).
        let bank = Tensor::from_slice(&[1f32, 0.0, 10.0, 1.0, 0.0, 3.0]).view([3, 2]);
        let labels = Tensor::from_slice(&[0i64, 1, 1]);
        let q = Tensor::from_slice(&[2f32, 0.0]).view([1, 2]);
        let s = knn_classify(&bank, &labels, &q, 2, 0.1, 3).unwrap();
        let v: Vec<f32> = Vec::try_from(s.flatten(0, -1)).unwrap();
        let c = 10.0f64 / 101f64.sqrt();
        assert!(
            (v[0] as f64 - 10f64.exp()).abs() / 10f64.exp() < 1e-5,
            "{v:?}"
        );
        assert!(
            (v[1] as f64 - (c / 0.1).exp()).abs() / (c / 0.1).exp() < 1e-5,
            "{v:?}"
        );
        assert_eq!(v[2], 0.0);
        // Chunking does not change results.
        let (bank, bl) = clusters(3, 10, 4, 1.0, 3);
        let a = knn_classify(&bank, &bl, &bank, 5, 0.1, 3).unwrap();
        let parts: Vec<Tensor> = (0..30)
            .step_by(7)
            .map(|s| {
                knn_classify(&bank, &bl, &bank.narrow(0, s, 7.min(30 - s)), 5, 0.1, 3).unwrap()
            })
            .collect();
        assert!(a.allclose(&Tensor::cat(&parts, 0), 1e-6, 1e-6, false));
    }

    #[test]
    fn errors_are_reported() {
        let (bank, bl) = clusters(2, 3, 4, 1.0, 4);
        let e = knn_classify(&bank, &bl, &bank, 7, 0.1, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fewer than k = 7"), "{e}");
        let e = knn_classify(&bank, &bl, &bank, 2, 0.1, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside [0, 1)"), "{e}");
        let e = knn_classify(&bank, &bl.narrow(0, 0, 5), &bank, 2, 0.1, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("labels of shape"), "{e}");
        let q = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
        assert!(knn_classify(&bank, &bl, &q, 2, 0.1, 2).is_err());
        assert!(knn_classify(&bank, &bl, &bank, 2, 0.0, 2).is_err());
        let ql = Tensor::from_slice(&[0i64, 1]);
        assert!(knn_accuracy(&bank, &bl, &bank, &ql, 2, 0.1, 2).is_err());
    }

    #[test]
    fn extract_features_and_knn_on_synthetic() {
        let src = SyntheticSource::new(120, 16, 16, 3, 11).unwrap();
        let idx: Vec<usize> = (0..120).collect();
        // Mean colour per channel as the "feature".
        let f = |x: &Tensor| Ok(x.mean_dim([2i64, 3].as_slice(), false, Kind::Float));
        let (feats, labels) = extract_features(&src, &idx, 16, 50, Device::Cpu, f).unwrap();
        assert_eq!(feats.size(), vec![120, 3]);
        let l: Vec<i64> = Vec::try_from(&labels).unwrap();
        assert_eq!(
            l,
            (0..120).map(|i| src.label(i).unwrap()).collect::<Vec<_>>()
        );
        let (bank, bl) = (feats.narrow(0, 0, 80), labels.narrow(0, 0, 80));
        let (q, ql) = (feats.narrow(0, 80, 40), labels.narrow(0, 80, 40));
        let r = knn_accuracy(&bank, &bl, &q, &ql, 10, 0.1, 3).unwrap();
        assert!(r.top1 > 0.9, "{r:?}");
    }

    #[test]
    fn extract_features_needs_labels() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("imgs");
        let mut bytes = vec![0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 4];
        bytes.extend(std::iter::repeat_n(7, 32));
        std::fs::write(&p, bytes).unwrap();
        let src = IdxSource::open(&p, None).unwrap();
        let e = extract_features(&src, &[0, 1], 4, 2, Device::Cpu, |x| Ok(x.shallow_clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no labels"), "{e}");
    }
}
