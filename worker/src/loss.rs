//! The Barlow Twins loss (see ../shared/design/BARLOW_TWINS.md).
//!
//! With A, B the embeddings of the two views standardized per feature over the **global** batch
//! (mean 0, biased variance 1, eps 1e-5, no affine parameters) and C = AᵀB / N,
//!
//! ```text
//! L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²
//! ```
//!
//! Two equivalent forms:
//! - [`LossForm::Cross`] builds the D × D matrix C: O(N·D²) work, D² memory.
//! - [`LossForm::Gram`] uses Σ_ij C_ij² = Σ_nm (AAᵀ)_nm (BBᵀ)_nm / N², through two N × N Gram
//!   matrices: O(N²·D), never materializing C. C_ii = Σ_n A_ni B_ni / N.
//!
//! [`LossForm::Auto`] picks Gram when N < D (the cheaper one). In both forms the off-diagonal
//! sum is (Σ_ij C_ij²) − Σ_i C_ii².
//!
//! The inputs are the global batch (gathered across ranks with gradient by the caller). The loss
//! is computed in fp32 at least (half/bfloat16 inputs are cast up; f64 stays f64).
//!
//! The loss depends on the batch size: perfectly decorrelated features still leave an
//! off-diagonal floor near λ·D(D−1)/N (≈167 at N = 2048, D = 8192; ≈1,337 at N = 256). Compare
//! runs with different batch sizes through [`LossStats::off_diag_normalized`] (≈1 at that floor)
//! and [`LossStats::mean_diag`], not through the raw loss.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// The default λ: the job spec's (`train.lambda`), defined there.
pub use bt_common::spec::DEFAULT_LAMBDA;
/// eps of the per-feature standardization (BatchNorm's default).
pub const STANDARDIZE_EPS: f64 = 1e-5;
/// Side of the |C| picture returned with the statistics.
pub const PICTURE_SIDE: i64 = 64;

/// How the off-diagonal sum is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossForm {
    /// Gram when N < D, else Cross.
    #[default]
    Auto,
    /// Through the D × D cross-correlation matrix.
    Cross,
    /// Through the two N × N Gram matrices.
    Gram,
}

impl LossForm {
    /// The concrete form used for a batch of `n` embeddings of width `d`.
    pub fn resolve(self, n: i64, d: i64) -> LossForm {
        match self {
            LossForm::Auto if n < d => LossForm::Gram,
            LossForm::Auto => LossForm::Cross,
            f => f,
        }
    }
}

/// Scalar statistics of one loss evaluation. Fields are NaN when not computed (statistics
/// not requested; the |C| ones also need [`LossOptions::c_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossStats {
    pub loss: f64,
    /// Σ_i (1 − C_ii)².
    pub on_diag: f64,
    /// Σ_{i≠j} C_ij², before λ.
    pub off_diag: f64,
    /// λ · off_diag.
    pub off_diag_scaled: f64,
    /// off_diag / (D(D−1)/N): 1 ≈ the floor of decorrelated features, comparable across N.
    pub off_diag_normalized: f64,
    /// mean_i C_ii.
    pub mean_diag: f64,
    /// mean_{i≠j} |C_ij|.
    pub mean_abs_off_diag: f64,
    /// max_{i≠j} |C_ij|.
    pub max_abs_off_diag: f64,
}

impl LossStats {
    fn nan() -> Self {
        LossStats {
            loss: f64::NAN,
            on_diag: f64::NAN,
            off_diag: f64::NAN,
            off_diag_scaled: f64::NAN,
            off_diag_normalized: f64::NAN,
            mean_diag: f64::NAN,
            mean_abs_off_diag: f64::NAN,
            max_abs_off_diag: f64::NAN,
        }
    }
}

/// Block means of |C|, `side` × `side`, row-major (side = min(64, D)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CPicture {
    pub side: usize,
    pub values: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossOptions {
    pub lambda: f64,
    pub form: LossForm,
    /// Fill the scalar statistics (one device sync).
    pub stats: bool,
    /// Also the |C| statistics (the Gram form then builds C once, without gradient).
    pub c_stats: bool,
    /// Also the downsampled |C| picture.
    pub picture: bool,
}

impl Default for LossOptions {
    fn default() -> Self {
        LossOptions {
            lambda: DEFAULT_LAMBDA,
            form: LossForm::Auto,
            stats: false,
            c_stats: false,
            picture: false,
        }
    }
}

#[derive(Debug)]
pub struct LossOutput {
    /// Scalar, differentiable w.r.t. both inputs.
    pub loss: Tensor,
    pub stats: LossStats,
    pub picture: Option<CPicture>,
    /// The form actually used (never Auto).
    pub form: LossForm,
}

/// The trainer's entry point: `want_stats` fills every statistic (including the |C| ones) and
/// the picture; without it no device sync happens and the statistics are NaN.
pub fn barlow_twins_loss(
    z_a: &Tensor,
    z_b: &Tensor,
    lambda: f64,
    form: LossForm,
    want_stats: bool,
) -> Result<LossOutput> {
    barlow_twins_loss_with(
        z_a,
        z_b,
        &LossOptions {
            lambda,
            form,
            stats: want_stats,
            c_stats: want_stats,
            picture: want_stats,
        },
    )
}

/// Per-feature standardization over dim 0: mean 0, biased variance 1 (eps 1e-5), no affine.
/// Same as `BatchNorm1d(affine=False)` in training mode; differentiable.
pub fn standardize(z: &Tensor) -> Result<Tensor> {
    let mean = z.f_mean_dim(0, true, z.kind())?;
    let centered = z.f_sub(&mean)?;
    let var = centered.f_square()?.f_mean_dim(0, true, z.kind())?;
    Ok(centered.f_div(&var.f_add_scalar(STANDARDIZE_EPS)?.f_sqrt()?)?)
}

/// C = AᵀB / N (D × D) of standardized embeddings `a`, `b` (N × D).
fn cross_correlation(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = a.size()[0] as f64;
    Ok(a.f_tr()?.f_mm(b)?.f_div_scalar(n)?)
}

fn prepare(z_a: &Tensor, z_b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (sa, sb) = (z_a.size(), z_b.size());
    if sa.len() != 2 || sa != sb || sa[0] < 1 || sa[1] < 1 {
        return Err(Error::Other(format!(
            "barlow twins loss: embeddings must be two non-empty N×D matrices of the same shape, got {sa:?} and {sb:?}"
        )));
    }
    let up = |z: &Tensor| -> Result<Tensor> {
        Ok(match z.kind() {
            Kind::Double => z.shallow_clone(),
            _ => z.f_to_kind(Kind::Float)?,
        })
    };
    Ok((standardize(&up(z_a)?)?, standardize(&up(z_b)?)?))
}

pub fn barlow_twins_loss_with(
    z_a: &Tensor,
    z_b: &Tensor,
    opts: &LossOptions,
) -> Result<LossOutput> {
    let (a, b) = prepare(z_a, z_b)?;
    let (n, d) = (a.size()[0], a.size()[1]);
    let nf = n as f64;
    let form = opts.form.resolve(n, d);
    let (diag, total_sq, c) = match form {
        LossForm::Cross => {
            let c = cross_correlation(&a, &b)?;
            let diag = c.f_diagonal(0, 0, 1)?;
            let total = c.f_square()?.f_sum(c.kind())?;
            (diag, total, Some(c))
        }
        // `resolve` never returns Auto.
        LossForm::Gram | LossForm::Auto => {
            let ga = a.f_mm(&a.f_tr()?)?;
            let gb = b.f_mm(&b.f_tr()?)?;
            let total = ga.f_mul(&gb)?.f_sum(ga.kind())?.f_div_scalar(nf * nf)?;
            let diag = a
                .f_mul(&b)?
                .f_sum_dim_intlist(0, false, a.kind())?
                .f_div_scalar(nf)?;
            (diag, total, None)
        }
    };
    let on = diag.f_sub_scalar(1.0)?.f_square()?.f_sum(diag.kind())?;
    let off = total_sq.f_sub(&diag.f_square()?.f_sum(diag.kind())?)?;
    let loss = on.f_add(&off.f_mul_scalar(opts.lambda)?)?;

    let mut stats = LossStats::nan();
    let mut picture = None;
    if opts.stats || opts.c_stats || opts.picture {
        let _guard = tch::no_grad_guard();
        let mut scalars = vec![
            loss.f_detach()?,
            on.f_detach()?,
            off.f_detach()?,
            diag.f_mean(diag.kind())?,
        ];
        if opts.c_stats || opts.picture {
            let c = match c {
                Some(c) => c.f_detach()?,
                None => cross_correlation(&a, &b)?,
            };
            let mut ac = c.f_abs()?; // a new tensor: safe to edit in place
            if opts.picture {
                let k = PICTURE_SIDE.min(d);
                let p = ac
                    .f_view([1, 1, d, d])?
                    .f_adaptive_avg_pool2d([k, k])?
                    .f_to_kind(Kind::Float)?
                    .f_to_device(tch::Device::Cpu)?
                    .f_flatten(0, -1)?;
                picture = Some(CPicture {
                    side: k as usize,
                    values: Vec::<f32>::try_from(&p)?,
                });
            }
            if opts.c_stats {
                let _ = ac.f_fill_diagonal_(0.0, false)?;
                let pairs = (d * (d - 1)).max(1) as f64;
                scalars.push(ac.f_sum(ac.kind())?.f_div_scalar(pairs)?);
                scalars.push(ac.f_max()?);
            }
        }
        let v = Vec::<f64>::try_from(
            &Tensor::f_stack(&scalars, 0)?
                .f_to_kind(Kind::Double)?
                .f_to_device(tch::Device::Cpu)?,
        )?;
        stats.loss = v[0];
        stats.on_diag = v[1];
        stats.off_diag = v[2];
        stats.off_diag_scaled = opts.lambda * v[2];
        stats.off_diag_normalized = if d > 1 {
            v[2] * nf / (d as f64 * (d as f64 - 1.0))
        } else {
            0.0
        };
        stats.mean_diag = v[3];
        if opts.c_stats {
            stats.mean_abs_off_diag = v[4];
            stats.max_abs_off_diag = v[5];
        }
    }
    Ok(LossOutput {
        loss,
        stats,
        picture,
        form,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn pair(n: i64, d: i64, kind: Kind) -> (Tensor, Tensor) {
        tch::manual_seed(7);
        let a = Tensor::randn([n, d], (kind, Device::Cpu));
        let b = &a * 0.8 + Tensor::randn([n, d], (kind, Device::Cpu)) * 0.6;
        (a, b)
    }

    fn opts(form: LossForm) -> LossOptions {
        LossOptions {
            form,
            stats: true,
            c_stats: true,
            picture: true,
            ..LossOptions::default()
        }
    }

    /// Straight from the definition with an explicit off-diagonal mask, in f64.
    fn naive(za: &Tensor, zb: &Tensor, lambda: f64) -> f64 {
        let za = za.to_kind(Kind::Double);
        let zb = zb.to_kind(Kind::Double);
        let n = za.size()[0] as f64;
        let d = za.size()[1];
        let std = |z: &Tensor| {
            let m = z.mean_dim(0, true, Kind::Double);
            let v = z.var_dim(0, false, true);
            (z - m) / (v + 1e-5).sqrt()
        };
        let c = std(&za).tr().mm(&std(&zb)) / n;
        let eye = Tensor::eye(d, (Kind::Double, Device::Cpu));
        let on = (c.diagonal(0, 0, 1) - 1.0).square().sum(Kind::Double);
        let mask: Tensor = 1.0 - &eye;
        let off = (&c * mask).square().sum(Kind::Double);
        (on + off * lambda).double_value(&[])
    }

    #[test]
    fn forms_agree_with_each_other_and_definition() {
        for (n, d) in [(8, 32), (40, 12), (16, 16)] {
            let (za, zb) = pair(n, d, Kind::Double);
            let want = naive(&za, &zb, DEFAULT_LAMBDA);
            let c = barlow_twins_loss_with(&za, &zb, &opts(LossForm::Cross)).unwrap();
            let g = barlow_twins_loss_with(&za, &zb, &opts(LossForm::Gram)).unwrap();
            assert_eq!(c.form, LossForm::Cross);
            assert_eq!(g.form, LossForm::Gram);
            for s in [c.stats, g.stats] {
                assert!(
                    (s.loss - want).abs() < 1e-9 * want.max(1.0),
                    "{} vs {want}",
                    s.loss
                );
            }
            let (cs, gs) = (c.stats, g.stats);
            for (x, y) in [
                (cs.on_diag, gs.on_diag),
                (cs.off_diag, gs.off_diag),
                (cs.mean_diag, gs.mean_diag),
                (cs.mean_abs_off_diag, gs.mean_abs_off_diag),
                (cs.max_abs_off_diag, gs.max_abs_off_diag),
            ] {
                assert!((x - y).abs() < 1e-9 * x.abs().max(1.0), "{x} vs {y}");
            }
            assert!((cs.off_diag_scaled - DEFAULT_LAMBDA * cs.off_diag).abs() < 1e-12);
            assert!((cs.loss - cs.on_diag - cs.off_diag_scaled).abs() < 1e-9);
            assert_eq!(c.picture, g.picture.clone().map(|p| CPicture { ..p }));
            let side = (d as usize).min(64);
            assert_eq!(c.picture.as_ref().unwrap().side, side);
            assert_eq!(c.picture.unwrap().values.len(), side * side);
        }
    }

    #[test]
    fn gradients_of_both_forms_agree() {
        let (za, zb) = pair(12, 20, Kind::Double);
        let grads = |form| {
            let a = za.detach().set_requires_grad(true);
            let b = zb.detach().set_requires_grad(true);
            let out = barlow_twins_loss_with(&a, &b, &opts(form)).unwrap();
            out.loss.backward();
            (a.grad(), b.grad())
        };
        let (ca, cb) = grads(LossForm::Cross);
        let (ga, gb) = grads(LossForm::Gram);
        assert!(ca.allclose(&ga, 1e-9, 1e-11, false));
        assert!(cb.allclose(&gb, 1e-9, 1e-11, false));
        assert!(ca.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    }

    #[test]
    fn fp32_half_inputs_and_auto_form() {
        let (za, zb) = pair(8, 32, Kind::Float);
        let want = naive(&za, &zb, 0.005);
        let out = barlow_twins_loss(
            &za.to_kind(Kind::Half),
            &zb.to_kind(Kind::Half),
            0.005,
            LossForm::Auto,
            true,
        )
        .unwrap();
        assert_eq!(out.form, LossForm::Gram);
        assert_eq!(out.loss.kind(), Kind::Float);
        // Half rounding of the inputs (~1e-3 relative) dominates.
        assert!(
            (out.stats.loss - want).abs() < 2e-2 * want,
            "{} vs {want}",
            out.stats.loss
        );
        assert_eq!(LossForm::Auto.resolve(64, 32), LossForm::Cross);
        let quiet = barlow_twins_loss(&za, &zb, 0.005, LossForm::Cross, false).unwrap();
        assert!(quiet.stats.loss.is_nan() && quiet.picture.is_none());
        assert!((quiet.loss.double_value(&[]) - want).abs() < 1e-4 * want);
    }

    #[test]
    fn perfect_correlation_and_decorrelated_floor() {
        let n = 16;
        let h = Tensor::eye(n, (Kind::Double, Device::Cpu));
        let z = &h - h.mean_dim(0, true, Kind::Double);
        let out = barlow_twins_loss_with(
            &z.narrow(1, 0, 8),
            &z.narrow(1, 0, 8),
            &opts(LossForm::Gram),
        )
        .unwrap();
        // Centred one-hot columns: C_ii = 1 (up to eps: var = 15/256, eps/var ≈ 1.7e-4),
        // C_ij = −1/(N−1) off the diagonal.
        let st = out.stats;
        assert!((st.mean_diag - 1.0).abs() < 1e-3, "{st:?}");
        assert!((st.max_abs_off_diag - 1.0 / 15.0).abs() < 1e-3, "{st:?}");
        assert!((st.mean_abs_off_diag - 1.0 / 15.0).abs() < 1e-3, "{st:?}");
        // Independent views: off_diag ≈ D(D−1)/N, normalized ≈ 1.
        tch::manual_seed(3);
        let za = Tensor::randn([512, 64], (Kind::Double, Device::Cpu));
        let zb = Tensor::randn([512, 64], (Kind::Double, Device::Cpu));
        let s = barlow_twins_loss_with(&za, &zb, &opts(LossForm::Auto))
            .unwrap()
            .stats;
        assert!((s.off_diag_normalized - 1.0).abs() < 0.1, "{s:?}");
        assert!(s.mean_diag.abs() < 0.1);
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let a = Tensor::zeros([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([4, 9], (Kind::Float, Device::Cpu));
        assert!(barlow_twins_loss(&a, &b, 0.005, LossForm::Auto, false).is_err());
    }
}
