//! LARS as in the official Barlow Twins code (see ../shared/design/BARLOW_TWINS.md):
//!
//! ```text
//! g = loss_scale · ∇p
//! if p is not 1-D:  dp = g + wd·p ;  q = η‖p‖/‖dp‖ if ‖p‖>0 and ‖dp‖>0 else 1 ;  dp = q·dp
//! else:             dp = g                         (biases, BN γ/β: no decay, no scaling)
//! μ = momentum·μ + dp ;  p = p − lr·μ
//! ```
//! with lr = lr_weights·factor(step) for weights and lr_biases·factor(step) for 1-D tensors.
//!
//! `loss_scale`: our trainers back-propagate the true gradient of the global-batch loss, which
//! makes a run independent of the number of ranks W. The official code's update used ∇L / W
//! (each of W GPUs back-propagated its share, DDP averaged), and its bias learning rate was
//! tuned with that factor. Set `loss_scale = 1/W_official` (1/32 for the paper) to reproduce the
//! official effective step; the default 1 uses the true gradient.
//!
//! Two implementations of the same arithmetic: per tensor, a chain of whole-tensor ops (any
//! device and dtype), and fused, on the CPU with fp32 dense tensors (contiguous or channels-last),
//! where every tensor is updated in one call to `worker/csrc/bt_optim.cpp` (two passes over a weight tensor's memory
//! instead of about fifteen). The fused path is used whenever the parameters allow it.
use std::ffi::{c_char, c_double, c_int};

use serde::{Deserialize, Serialize};
use tch::Tensor;
use torch_sys::C_tensor;

use crate::model::NamedTensor;
use crate::{Error, Result};

use super::schedule::LrSchedule;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LarsConfig {
    /// Learning rate of the weights group (× schedule factor). Official: 0.2.
    pub lr_weights: f64,
    /// Learning rate of the biases/BN group (× schedule factor). Official: 0.0048.
    pub lr_biases: f64,
    /// Weights group only. Official code 1e-6 (paper 1.5e-6).
    pub weight_decay: f64,
    pub momentum: f64,
    /// Trust coefficient η.
    pub eta: f64,
    /// Multiplies every gradient before the update (see the module docs).
    pub loss_scale: f64,
}

impl Default for LarsConfig {
    fn default() -> Self {
        LarsConfig {
            lr_weights: 0.2,
            lr_biases: 0.0048,
            weight_decay: 1e-6,
            momentum: 0.9,
            eta: 0.001,
            loss_scale: 1.0,
        }
    }
}

/// Which learning rate (and rule) a parameter gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamGroup {
    /// Tensors of dimension ≠ 1: decay + LARS scaling, `lr_weights`.
    Weights,
    /// 1-D tensors (biases, BN γ/β): plain momentum SGD, `lr_biases`.
    BiasesAndNorm,
}

struct Slot {
    name: String,
    param: Tensor,
    group: ParamGroup,
    momentum: Tensor,
}

extern "C" {
    fn bt_lars_step_cpu(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        moms: *const *mut C_tensor,
        weight: *const c_int,
        n: c_int,
        scale: c_double,
        weight_decay: c_double,
        momentum: c_double,
        eta: c_double,
        lr_w: c_double,
        lr_b: c_double,
    ) -> *mut c_char;
}

pub struct Lars {
    cfg: LarsConfig,
    schedule: LrSchedule,
    slots: Vec<Slot>,
    /// Every parameter (and so its gradient and momentum, laid out alike) is a dense fp32 CPU
    /// tensor: the fused step applies (unless turned off with [`Lars::set_fused`]).
    fused: bool,
}

impl Lars {
    /// `params`: the model's trainable tensors (e.g. `model.parameters()`); momentum buffers
    /// start at zero (as the official code's first step, μ = dp).
    pub fn new(
        params: &[NamedTensor],
        cfg: LarsConfig,
        global_batch: usize,
        warmup_steps: u64,
        total_steps: u64,
    ) -> Self {
        Self::with_schedule(
            params,
            cfg,
            LrSchedule::new(global_batch, warmup_steps, total_steps),
        )
    }

    pub fn with_schedule(params: &[NamedTensor], cfg: LarsConfig, schedule: LrSchedule) -> Self {
        let slots = params
            .iter()
            .map(|p| Slot {
                name: p.name.clone(),
                param: p.tensor.shallow_clone(),
                group: if p.tensor.dim() == 1 {
                    ParamGroup::BiasesAndNorm
                } else {
                    ParamGroup::Weights
                },
                momentum: tch::no_grad(|| p.tensor.zeros_like()),
            })
            .collect();
        let mut lars = Lars {
            cfg,
            schedule,
            slots,
            fused: false,
        };
        lars.set_fused(true);
        lars
    }

    /// Whether steps run fused (see the module docs).
    pub fn is_fused(&self) -> bool {
        self.fused
    }

    /// Turns the fused step off (the per-tensor path, for comparison), or back on where the
    /// parameters allow it; returns whether steps now run fused.
    pub fn set_fused(&mut self, on: bool) -> bool {
        self.fused = on
            && !self.slots.is_empty()
            && self.slots.iter().all(|s| {
                s.param.device() == tch::Device::Cpu
                    && s.param.kind() == tch::Kind::Float
                    && is_dense(&s.param)
            });
        self.fused
    }

    pub fn config(&self) -> &LarsConfig {
        &self.cfg
    }

    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }

    /// The parameter tensors in order (for the gradient all-reduce).
    pub fn param_tensors(&self) -> Vec<Tensor> {
        self.slots.iter().map(|s| s.param.shallow_clone()).collect()
    }

    /// (name, group) of every parameter.
    pub fn groups(&self) -> Vec<(String, ParamGroup)> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), s.group))
            .collect()
    }

    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.param.zero_grad();
        }
    }

    /// (lr_weights, lr_biases) at global step `step`.
    pub fn learning_rates(&self, step: u64) -> (f64, f64) {
        let f = self.schedule.factor(step);
        (f * self.cfg.lr_weights, f * self.cfg.lr_biases)
    }

    /// One update at (0-based) global step `step`; returns the weights' learning rate used.
    /// Parameters without a gradient are skipped. No device synchronisation.
    pub fn step(&mut self, step: u64) -> Result<f64> {
        let (lr_w, lr_b) = self.learning_rates(step);
        if self.fused {
            self.step_fused(lr_w, lr_b)?;
            return Ok(lr_w);
        }
        let cfg = self.cfg;
        let _guard = tch::no_grad_guard();
        for s in &mut self.slots {
            let g = s.param.grad();
            if !g.defined() {
                continue;
            }
            let g = if cfg.loss_scale != 1.0 {
                g.f_mul_scalar(cfg.loss_scale)?
            } else {
                g
            };
            let (dp, lr) = match s.group {
                ParamGroup::BiasesAndNorm => (g, lr_b),
                ParamGroup::Weights => {
                    let dp = g.f_add(&s.param.f_mul_scalar(cfg.weight_decay)?)?;
                    let pn = s.param.f_norm()?;
                    let un = dp.f_norm()?;
                    let one = pn.f_ones_like()?;
                    let ratio = pn.f_div(&un)?.f_mul_scalar(cfg.eta)?;
                    let q = ratio.f_where_self(&un.f_gt(0.0)?, &one)?;
                    let q = q.f_where_self(&pn.f_gt(0.0)?, &one)?;
                    (dp.f_mul(&q)?, lr_w)
                }
            };
            let _ = s.momentum.f_mul_scalar_(cfg.momentum)?.f_add_(&dp)?;
            let _ = s.param.f_sub_(&s.momentum.f_mul_scalar(lr)?)?;
        }
        Ok(lr_w)
    }

    /// Every tensor in one call of the CPU kernel; a gradient that is not a dense fp32 tensor
    /// laid out like its parameter (or a momentum buffer replaced by one that is not) is an error, not a silent
    /// fallback.
    fn step_fused(&mut self, lr_w: f64, lr_b: f64) -> Result<()> {
        let grads: Vec<Tensor> = self.slots.iter().map(|s| s.param.grad()).collect();
        let ptr = |t: &Tensor| t.as_ptr() as *mut C_tensor;
        let params: Vec<*mut C_tensor> = self.slots.iter().map(|s| ptr(&s.param)).collect();
        let moms: Vec<*mut C_tensor> = self.slots.iter().map(|s| ptr(&s.momentum)).collect();
        let gptr: Vec<*mut C_tensor> = grads
            .iter()
            .map(|g| {
                if g.defined() {
                    ptr(g)
                } else {
                    std::ptr::null_mut()
                }
            })
            .collect();
        let weight: Vec<c_int> = self
            .slots
            .iter()
            .map(|s| c_int::from(s.group == ParamGroup::Weights))
            .collect();
        let c = self.cfg;
        // SAFETY: every pointer is a live tensor owned by `self.slots` or `grads` for the call;
        // the kernel checks device, dtype, contiguity and sizes before touching memory.
        let err = unsafe {
            bt_lars_step_cpu(
                params.as_ptr(),
                gptr.as_ptr(),
                moms.as_ptr(),
                weight.as_ptr(),
                params.len() as c_int,
                c.loss_scale,
                c.weight_decay,
                c.momentum,
                c.eta,
                lr_w,
                lr_b,
            )
        };
        crate::dist::ffi_take_error(err, "lars", Error::Other)
    }

    /// The momentum buffers, named like their parameters (shallow clones: they share storage).
    pub fn momentum_buffers(&self) -> Vec<NamedTensor> {
        self.slots
            .iter()
            .map(|s| NamedTensor {
                name: s.name.clone(),
                tensor: s.momentum.shallow_clone(),
                role: crate::model::TensorRole::Buffer,
            })
            .collect()
    }

    /// Replaces the momentum buffers (e.g. from a checkpoint); every parameter must be present
    /// with its shape.
    pub fn load_momentum_buffers(
        &mut self,
        src: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        for s in &self.slots {
            let t = src.get(&s.name).ok_or_else(|| {
                Error::Other(format!("lars: no momentum buffer for parameter {}", s.name))
            })?;
            if t.size() != s.momentum.size() {
                return Err(Error::Other(format!(
                    "lars: momentum buffer {}: shape {:?}, parameter has {:?}",
                    s.name,
                    t.size(),
                    s.momentum.size()
                )));
            }
        }
        tch::no_grad(|| -> Result<()> {
            for s in &mut self.slots {
                s.momentum.f_copy_(&src[&s.name])?;
            }
            Ok(())
        })
    }
}

/// Whether `t`'s elements fill one block of memory without gaps or overlaps (contiguous in some
/// order of its dimensions: row-major, channels-last, ...), so a kernel may walk it flat.
fn is_dense(t: &Tensor) -> bool {
    let (sizes, strides) = (t.size(), t.stride());
    let mut dims: Vec<(i64, i64)> = sizes
        .into_iter()
        .zip(strides)
        .filter(|&(size, _)| size != 1)
        .collect();
    dims.sort_by_key(|&(_, stride)| stride);
    let mut expected = 1i64;
    for (size, stride) in dims {
        if size == 0 || stride != expected {
            return false;
        }
        expected *= size;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TensorRole;
    use tch::{Device, Kind};

    fn named(name: &str, t: Tensor) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            tensor: t.set_requires_grad(true),
            role: TensorRole::Parameter,
        }
    }

    fn d(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    #[test]
    fn weights_get_decay_and_trust_ratio_1d_do_not() {
        let w0 = Tensor::from_slice(&[3.0f64, -4.0, 1.0, 2.0]).view([2, 2]);
        let b0 = Tensor::from_slice(&[0.5f64, -1.0]);
        let params = vec![named("w", w0.copy()), named("b", b0.copy())];
        let cfg = LarsConfig {
            weight_decay: 0.1,
            loss_scale: 0.5,
            ..LarsConfig::default()
        };
        // global batch 256, no warm-up, long run: factor ≈ 1 at step 0.
        let mut opt = Lars::new(&params, cfg, 256, 0, 1_000_000);
        assert_eq!(
            opt.groups().iter().map(|g| g.1).collect::<Vec<_>>(),
            vec![ParamGroup::Weights, ParamGroup::BiasesAndNorm]
        );
        let gw = Tensor::from_slice(&[1.0f64, 2.0, -1.0, 0.0]).view([2, 2]);
        let gb = Tensor::from_slice(&[0.25f64, 4.0]);
        let run_step = |opt: &mut Lars, step| {
            opt.zero_grad();
            let l = (&params[0].tensor * &gw).sum(Kind::Double)
                + (&params[1].tensor * &gb).sum(Kind::Double);
            l.backward();
            opt.step(step).unwrap()
        };
        let lr = run_step(&mut opt, 0);
        assert!((lr - 0.2).abs() < 1e-12);
        // Weights by hand.
        let g = &gw * 0.5;
        let dp = &g + &w0 * 0.1;
        let q = 0.001 * w0.norm().double_value(&[]) / dp.norm().double_value(&[]);
        let mu_w = &dp * q;
        let want_w = &w0 - &mu_w * 0.2;
        // Biases: plain scaled gradient, no decay, no trust ratio.
        let mu_b = &gb * 0.5;
        let want_b = &b0 - &mu_b * 0.0048;
        for (x, y) in d(&params[0].tensor).iter().zip(d(&want_w)) {
            assert!((x - y).abs() < 1e-14);
        }
        for (x, y) in d(&params[1].tensor).iter().zip(d(&want_b)) {
            assert!((x - y).abs() < 1e-14);
        }
        // Second step: momentum accumulates (μ = 0.9μ + dp).
        let w1 = params[1].tensor.copy();
        run_step(&mut opt, 1);
        let mu_b2 = &mu_b * 0.9 + &gb * 0.5;
        let f1 = LrSchedule::new(256, 0, 1_000_000).factor(1);
        let want_b2 = &w1 - &mu_b2 * (0.0048 * f1);
        for (x, y) in d(&params[1].tensor).iter().zip(d(&want_b2)) {
            assert!((x - y).abs() < 1e-14);
        }
        let m = opt.momentum_buffers();
        assert_eq!(m[1].name, "b");
        for (x, y) in d(&m[1].tensor).iter().zip(d(&mu_b2)) {
            assert!((x - y).abs() < 1e-14);
        }
    }

    #[test]
    fn zero_weight_uses_unit_trust_ratio_and_missing_grad_is_skipped() {
        let params = vec![
            named("w", Tensor::zeros([2, 3], (Kind::Double, Device::Cpu))),
            named("unused", Tensor::ones([3, 3], (Kind::Double, Device::Cpu))),
        ];
        let mut opt = Lars::new(&params, LarsConfig::default(), 256, 0, 100);
        let l = (&params[0].tensor * 2.0).sum(Kind::Double);
        l.backward();
        opt.step(0).unwrap();
        // ‖p‖ = 0 → q = 1, dp = g = 2: p = −0.2·2.
        assert!(d(&params[0].tensor)
            .iter()
            .all(|&v| (v + 0.4).abs() < 1e-12));
        assert!(d(&params[1].tensor).iter().all(|&v| v == 1.0));
    }

    /// The fused CPU step and the per-tensor ops agree: weights (with loss scale, decay, trust
    /// ratio), a 1-D tensor, a parameter without a gradient and a zero weight, over three steps
    /// (momentum carried). Only the norms' accumulation differs (double in the kernel), so the
    /// agreement is to fp32 rounding, not bit for bit.
    #[test]
    fn fused_step_matches_the_per_tensor_ops() {
        tch::manual_seed(7);
        let shapes: [&[i64]; 5] = [&[64, 32, 3, 3], &[300], &[128, 96], &[7, 5], &[4, 4]];
        let init: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i == 3 {
                    Tensor::zeros(*s, (Kind::Float, Device::Cpu))
                } else {
                    Tensor::randn(*s, (Kind::Float, Device::Cpu))
                }
            })
            .collect();
        let grads: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)) * 0.01)
            .collect();
        let cfg = LarsConfig {
            loss_scale: 0.25,
            ..LarsConfig::default()
        };
        let run = |fused: bool| {
            let params: Vec<NamedTensor> = init
                .iter()
                .enumerate()
                .map(|(i, t)| named(&format!("p{i}"), t.copy()))
                .collect();
            let mut opt = Lars::new(&params, cfg, 256, 2, 100);
            assert!(opt.is_fused());
            assert_eq!(opt.set_fused(fused), fused);
            for step in 0..3 {
                opt.zero_grad();
                // Parameter 4 gets no gradient: skipped by both paths.
                let l = params[..4]
                    .iter()
                    .zip(&grads)
                    .map(|(p, g)| (&p.tensor * g).sum(Kind::Float))
                    .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
                l.backward();
                opt.step(step).unwrap();
            }
            let moms = opt.momentum_buffers();
            (params, moms)
        };
        let (pf, mf) = run(true);
        let (pt, mt) = run(false);
        for (a, b) in pf.iter().zip(&pt) {
            let d = (&a.tensor - &b.tensor).abs().max().double_value(&[]);
            let scale = b.tensor.abs().max().double_value(&[]).max(1e-6);
            assert!(d / scale < 1e-6, "{}: {d:e} apart", a.name);
        }
        for (a, b) in mf.iter().zip(&mt) {
            let d = (&a.tensor - &b.tensor).abs().max().double_value(&[]);
            let scale = b.tensor.abs().max().double_value(&[]).max(1e-6);
            assert!(d / scale < 1e-5, "momentum {}: {d:e} apart", a.name);
        }
        assert!(pf[4].tensor.equal(&init[4]), "no gradient, no update");
        assert!(!pf[0].tensor.equal(&init[0]), "the weights moved");
    }

    /// Channels-last weights (the bf16 + channels-last setting) take the fused path too, and it
    /// agrees with the per-tensor ops on them; a strided view is not dense and is refused.
    #[test]
    fn fused_step_takes_channels_last_weights() {
        tch::manual_seed(11);
        let w =
            crate::amp::to_channels_last(&Tensor::randn([16, 8, 3, 3], (Kind::Float, Device::Cpu)))
                .unwrap();
        assert!(!w.is_contiguous() && is_dense(&w));
        let g = crate::amp::to_channels_last(
            &(Tensor::randn([16, 8, 3, 3], (Kind::Float, Device::Cpu)) * 0.01),
        )
        .unwrap();
        let run = |fused: bool| {
            let p = named("w", w.copy());
            let params = vec![
                p,
                named("b", Tensor::ones([16], (Kind::Float, Device::Cpu))),
            ];
            assert_eq!(
                params[0].tensor.stride(),
                w.stride(),
                "copy keeps the layout"
            );
            let mut opt = Lars::new(&params, LarsConfig::default(), 256, 2, 100);
            assert_eq!(opt.set_fused(fused), fused);
            for step in 0..3 {
                opt.zero_grad();
                let l =
                    (&params[0].tensor * &g).sum(Kind::Float) + params[1].tensor.sum(Kind::Float);
                l.backward();
                opt.step(step).unwrap();
            }
            params
        };
        let (a, b) = (run(true), run(false));
        for (x, y) in a.iter().zip(&b) {
            let d = (&x.tensor - &y.tensor).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{}: {d:e} apart", x.name);
        }
        // A 1x1 convolution's weight in channels-last: autograd may give its gradient other
        // strides on the size-1 dimensions, which address the same memory.
        let w1 =
            crate::amp::to_channels_last(&Tensor::randn([8, 4, 1, 1], (Kind::Float, Device::Cpu)))
                .unwrap();
        let p1 = named("w1", w1.copy());
        let mut opt = Lars::new(
            std::slice::from_ref(&p1),
            LarsConfig::default(),
            256,
            2,
            100,
        );
        assert!(opt.is_fused());
        let g1 = Tensor::randn([8, 4, 1, 1], (Kind::Float, Device::Cpu)).as_strided(
            [8, 4, 1, 1],
            [4, 1, 4, 4],
            None,
        );
        let l = (&p1.tensor * &g1).sum(Kind::Float);
        l.backward();
        opt.step(0).unwrap();
        let strided = Tensor::randn([4, 6], (Kind::Float, Device::Cpu)).slice(1, 0, 6, 2);
        assert!(!is_dense(&strided));
        assert!(is_dense(
            &Tensor::randn([4, 1, 6], (Kind::Float, Device::Cpu)).transpose(0, 2)
        ));
    }

    #[test]
    fn momentum_buffers_load_checks_shapes() {
        let params = vec![named("w", Tensor::ones([2, 2], (Kind::Float, Device::Cpu)))];
        let mut opt = Lars::new(&params, LarsConfig::default(), 256, 10, 100);
        let mut src = std::collections::HashMap::new();
        src.insert(
            "w".to_string(),
            Tensor::full([2, 2], 3.0, (Kind::Float, Device::Cpu)),
        );
        opt.load_momentum_buffers(&src).unwrap();
        assert_eq!(d(&opt.momentum_buffers()[0].tensor), vec![3.0; 4]);
        src.insert(
            "w".to_string(),
            Tensor::zeros([4], (Kind::Float, Device::Cpu)),
        );
        let e = opt.load_momentum_buffers(&src).unwrap_err().to_string();
        assert!(
            e.contains("w") && e.contains("[4]") && e.contains("[2, 2]"),
            "{e}"
        );
    }
}
