//! Gang placement as a pure function: no I/O, tested on its own. The core's scheduling loop feeds
//! it the queue and the free devices and applies what it returns.
use bt_common::{JobId, WorkerId};

#[derive(Debug, Clone, PartialEq)]
pub struct QueuedJob {
    pub id: JobId,
    pub priority: i32,
    pub created_ms: i64,
    /// The world sizes the job may be placed at, largest first (its `world_size` alone unless
    /// it is elastic).
    pub world_sizes: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FreeWorker {
    pub id: WorkerId,
    /// Tie-break for a stable order.
    pub name: String,
    /// Free device indices.
    pub devices: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub job_id: JobId,
    /// `ranks[r]` is the worker and device of rank `r`.
    pub ranks: Vec<(WorkerId, u32)>,
}

/// Places jobs in priority order (higher first, then oldest first). Gang scheduling: a job is
/// placed only when all the ranks of one of its world sizes fit at once, the largest that fits.
/// Strict: the first job that fits at none stops the pass, so a large job is never starved by
/// smaller ones behind it.
///
/// Ranks fill the workers with the most free devices first (fewer nodes per job), rank 0 on the
/// first of them.
pub fn plan(queue: &[QueuedJob], free: &[FreeWorker]) -> Vec<Placement> {
    plan_with_waits(queue, free).0
}

/// Why a queued job was not placed by a pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Wait {
    /// The head of the queue: its gang does not fit in what is free (`needed`: its smallest
    /// world size).
    Devices {
        needed: u32,
        free: usize,
        workers: usize,
    },
    /// Behind the head of the queue, which places first (no backfill).
    Behind(JobId),
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::Devices {
                needed,
                free,
                workers,
            } => write!(
                f,
                "needs {needed} devices at once; {free} free on {workers} online worker{}",
                if *workers == 1 { "" } else { "s" }
            ),
            Wait::Behind(head) => write!(f, "behind job {head}, which is placed first"),
        }
    }
}

/// [`plan`], and the reason each job left in the queue waits.
pub fn plan_with_waits(
    queue: &[QueuedJob],
    free: &[FreeWorker],
) -> (Vec<Placement>, Vec<(JobId, Wait)>) {
    let mut jobs: Vec<&QueuedJob> = queue.iter().collect();
    // Stable: jobs submitted in the same millisecond keep the queue's order (the store's
    // submission order), not the order of their random ids.
    jobs.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.created_ms.cmp(&b.created_ms))
    });
    let mut pool: Vec<(WorkerId, String, Vec<u32>)> = free
        .iter()
        .map(|w| {
            let mut d = w.devices.clone();
            d.sort_unstable();
            d.dedup();
            (w.id, w.name.clone(), d)
        })
        .collect();
    let mut out = Vec::new();
    let mut waits = Vec::new();
    let mut head: Option<JobId> = None;
    for job in jobs {
        if let Some(head) = head {
            waits.push((job.id, Wait::Behind(head)));
            continue;
        }
        let available: usize = pool.iter().map(|(_, _, d)| d.len()).sum();
        let fits = job
            .world_sizes
            .iter()
            .map(|w| *w as usize)
            .find(|w| *w > 0 && *w <= available);
        let Some(world) = fits else {
            head = Some(job.id);
            waits.push((
                job.id,
                Wait::Devices {
                    needed: job.world_sizes.iter().copied().min().unwrap_or(0),
                    free: available,
                    workers: free.len(),
                },
            ));
            continue;
        };
        pool.sort_by(|a, b| b.2.len().cmp(&a.2.len()).then(a.1.cmp(&b.1)));
        let mut ranks = Vec::with_capacity(world);
        for (wid, _, devices) in pool.iter_mut() {
            while ranks.len() < world && !devices.is_empty() {
                ranks.push((*wid, devices.remove(0)));
            }
        }
        out.push(Placement {
            job_id: job.id,
            ranks,
        });
    }
    (out, waits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(priority: i32, created_ms: i64, world_size: u32) -> QueuedJob {
        QueuedJob {
            id: JobId::new(),
            priority,
            created_ms,
            world_sizes: vec![world_size],
        }
    }

    fn w(name: &str, devices: &[u32]) -> FreeWorker {
        FreeWorker {
            id: WorkerId::new(),
            name: name.into(),
            devices: devices.to_vec(),
        }
    }

    #[test]
    fn every_job_left_queued_says_why() {
        let (big, small) = (q(0, 1, 4), q(0, 2, 1));
        let (placed, waits) = plan_with_waits(&[big.clone(), small.clone()], &[w("a", &[0, 1])]);
        assert!(placed.is_empty());
        assert_eq!(
            waits,
            vec![
                (
                    big.id,
                    Wait::Devices {
                        needed: 4,
                        free: 2,
                        workers: 1
                    }
                ),
                (small.id, Wait::Behind(big.id)),
            ]
        );
        assert_eq!(
            waits[0].1.to_string(),
            "needs 4 devices at once; 2 free on 1 online worker"
        );
    }

    #[test]
    fn gang_waits_for_all_devices() {
        let job = q(0, 1, 4);
        let free = [w("a", &[0, 1]), w("b", &[0])];
        assert!(plan(std::slice::from_ref(&job), &free).is_empty());
        let free = [w("a", &[0, 1]), w("b", &[0, 1])];
        let p = plan(std::slice::from_ref(&job), &free);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].job_id, job.id);
        assert_eq!(p[0].ranks.len(), 4);
        let mut seen = p[0].ranks.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 4, "no device is used twice");
    }

    #[test]
    fn higher_priority_first_then_fifo() {
        let old_low = q(0, 1, 1);
        let new_high = q(5, 10, 1);
        let mid_a = q(1, 3, 1);
        let mid_b = q(1, 2, 1);
        let free = [w("a", &[0, 1])];
        let p = plan(
            &[
                old_low.clone(),
                new_high.clone(),
                mid_a.clone(),
                mid_b.clone(),
            ],
            &free,
        );
        let ids: Vec<JobId> = p.iter().map(|p| p.job_id).collect();
        assert_eq!(ids, vec![new_high.id, mid_b.id]);
    }

    #[test]
    fn strict_order_no_partial_placement_and_no_backfill() {
        let big = q(1, 1, 3);
        let small = q(0, 2, 1);
        let free = [w("a", &[0, 1])];
        assert!(
            plan(&[big.clone(), small.clone()], &free).is_empty(),
            "the small job must not jump ahead of the big one it would starve"
        );
        let p = plan(std::slice::from_ref(&small), &free);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn packs_onto_fewest_workers_and_consumes_devices() {
        let a = q(0, 1, 2);
        let b = q(0, 2, 2);
        let c = q(0, 3, 1);
        let free = [w("x", &[3]), w("y", &[0, 1]), w("z", &[7])];
        let p = plan(&[a.clone(), b.clone(), c.clone()], &free);
        assert_eq!(p.len(), 2, "c does not fit after a and b: {p:?}");
        assert_eq!(p[0].ranks, vec![(free[1].id, 0), (free[1].id, 1)]);
        assert_eq!(p[1].ranks, vec![(free[0].id, 3), (free[2].id, 7)]);
    }

    /// An elastic job of 4 ranks (min 2, global batch 16: 3 does not divide it) takes the largest
    /// size that fits; a job of fixed size 4 waits in the same spot.
    #[test]
    fn elastic_job_takes_the_largest_size_that_fits() {
        let spec: bt_common::JobSpec = bt_common::JobSpec::from_toml_str(
            "world_size = 4\n[elastic]\nmin_world_size = 2\n[train]\nbatch_size = 16",
        )
        .unwrap();
        let elastic = QueuedJob {
            world_sizes: spec.allowed_world_sizes(),
            ..q(0, 1, 4)
        };
        assert_eq!(elastic.world_sizes, [4, 2]);
        let three = [w("a", &[0, 1]), w("b", &[0])];
        let p = plan(std::slice::from_ref(&elastic), &three);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].ranks, vec![(three[0].id, 0), (three[0].id, 1)]);
        let four = [w("a", &[0, 1]), w("b", &[0, 1])];
        assert_eq!(
            plan(std::slice::from_ref(&elastic), &four)[0].ranks.len(),
            4
        );

        let fixed = q(0, 1, 4);
        let (placed, waits) = plan_with_waits(std::slice::from_ref(&fixed), &three);
        assert!(placed.is_empty());
        assert_eq!(
            waits,
            vec![(
                fixed.id,
                Wait::Devices {
                    needed: 4,
                    free: 3,
                    workers: 2
                }
            )]
        );
        // An elastic head that fits at none of its sizes waits for its smallest one, and the
        // jobs behind it still wait for it (no backfill).
        let small = q(0, 2, 1);
        let (placed, waits) = plan_with_waits(&[elastic.clone(), small.clone()], &[w("a", &[0])]);
        assert!(placed.is_empty());
        assert_eq!(
            waits,
            vec![
                (
                    elastic.id,
                    Wait::Devices {
                        needed: 2,
                        free: 1,
                        workers: 1
                    }
                ),
                (small.id, Wait::Behind(elastic.id)),
            ]
        );
    }

    #[test]
    fn empty_inputs() {
        assert!(plan(&[], &[w("a", &[0])]).is_empty());
        assert!(plan(&[q(0, 1, 1)], &[]).is_empty());
    }
}
