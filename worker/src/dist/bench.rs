//! Timings of the collectives the trainer uses (printed by `bt-dist-probe bench`, compared with
//! torch.distributed by `bench/dist_bench.sh`).
use std::time::Instant;

use tch::{Kind, Tensor};

use super::ProcessGroup;
use crate::Result;

/// One measured figure: a name and the median of its repetitions in milliseconds.
#[derive(Debug, Clone)]
pub struct Timing {
    pub name: String,
    pub bytes: usize,
    pub median_ms: f64,
}

impl Timing {
    /// Algorithm bandwidth (bytes of the buffer per second), GB/s.
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / (self.median_ms / 1e3) / 1e9
    }
}

fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up (connections, allocations)
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&mut v))
}

/// The median of timings (the upper one of the middle two for an even count); sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// All-reduce of flat fp32 buckets of each size in `bucket_mb`, all-reduce of `grad_mb` of
/// gradients in 25 MB buckets, packed per call ([`ProcessGroup::allreduce_grads`]) and aliased
/// ([`super::GradBuckets`]), all-gather of `gather_rows` × `gather_dim` fp32 per rank into a new
/// tensor and into a reused buffer, and barrier.
pub fn run(
    pg: &ProcessGroup,
    bucket_mb: &[usize],
    grad_mb: usize,
    gather_rows: i64,
    gather_dim: i64,
    reps: usize,
) -> Result<Vec<Timing>> {
    let dev = pg.device();
    let mut out = Vec::new();
    for &mb in bucket_mb {
        let n = (mb << 20) as i64 / 4;
        let t = Tensor::ones([n], (Kind::Float, dev));
        let ms = median_ms(reps, || pg.all_reduce_sum(&t))?;
        out.push(Timing {
            name: format!("all_reduce {mb} MB"),
            bytes: (n * 4) as usize,
            median_ms: ms,
        });
    }
    if grad_mb > 0 {
        // ~ResNet-shaped parameter list: many small tensors and a few large ones
        let total = (grad_mb << 20) as i64 / 4;
        let sizes = [64i64, 256, 4096, 65536, 147456, 589824, 2359296];
        let mut params = Vec::new();
        let mut used = 0;
        while used < total {
            let s = sizes[params.len() % sizes.len()].min(total - used);
            used += s;
            let p = Tensor::zeros([s], (Kind::Float, dev)).set_requires_grad(true);
            p.sum(Kind::Float).backward();
            params.push(p);
        }
        let what = format!(
            "grads {grad_mb} MB in {} tensors, 25 MB buckets",
            params.len()
        );
        let ms = median_ms(reps, || pg.allreduce_grads(&params, 25 << 20))?;
        out.push(Timing {
            name: format!("{what}, packed"),
            bytes: (used * 4) as usize,
            median_ms: ms,
        });
        let mut buckets = pg.grad_buckets(&params, 25 << 20)?;
        let ms = median_ms(reps, || buckets.all_reduce())?;
        out.push(Timing {
            name: format!("{what}, aliased"),
            bytes: (used * 4) as usize,
            median_ms: ms,
        });
    }
    let e = Tensor::ones([gather_rows, gather_dim], (Kind::Float, dev));
    let bytes = (gather_rows * gather_dim * 4) as usize;
    // Millisecond-scale figures: more repetitions for a stable median.
    let ms = median_ms(reps * 4, || pg.all_gather(&e).map(drop))?;
    out.push(Timing {
        name: format!("all_gather {gather_rows}x{gather_dim}, new output"),
        bytes,
        median_ms: ms,
    });
    let gathered = Tensor::empty(
        [gather_rows * pg.world_size() as i64, gather_dim],
        (Kind::Float, dev),
    );
    let ms = median_ms(reps * 4, || pg.all_gather_into(&e, &gathered))?;
    out.push(Timing {
        name: format!("all_gather {gather_rows}x{gather_dim}, into buffer"),
        bytes,
        median_ms: ms,
    });
    let ms = median_ms(reps * 10, || pg.barrier())?;
    out.push(Timing {
        name: "barrier".into(),
        bytes: 0,
        median_ms: ms,
    });
    Ok(out)
}
