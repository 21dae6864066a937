//! Elastic restarts: after a node is lost, a job whose spec allows fewer ranks
//! (`elastic.min_world_size`) restarts on the devices left; a job that does not waits for its
//! whole gang.
use std::time::Duration;

use bt_proto::{coordinator_message, job_event, trainer_report, Assignment, JobState, TrainerExit};

use crate::harness::*;

/// Four ranks over a global batch of 16 (so 3 ranks is never a split), elastic down to
/// `min_world_size` (0: not elastic).
fn four_ranks(min_world_size: u32) -> String {
    format!(
        "name = \"elastic\"\nworld_size = 4\n[restart]\nmax_restarts = 2\n\
         [elastic]\nmin_world_size = {min_world_size}\n[train]\nbatch_size = 16\n"
    )
}

/// The job runs its 4 ranks on node-a and node-b (2 devices each); node-b's session closes (the
/// node is lost), node-a's ranks are cancelled and exit. Returns node-a and the job's id.
async fn lose_one_of_two_nodes(c: &Coord, spec: &str) -> (FakeDaemon, String) {
    let mut a = FakeDaemon::connect(c, "node-a", 2).await;
    let mut b = FakeDaemon::connect(c, "node-b", 2).await;
    let job = c.submit(spec).await;
    let on_a = [a.next_assignment().await, a.next_assignment().await];
    let on_b = [b.next_assignment().await, b.next_assignment().await];
    let mut ranks: Vec<u32> = on_a.iter().chain(&on_b).map(|x| x.rank).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1, 2, 3]);
    for x in on_a.iter().chain(&on_b) {
        assert_eq!(
            x.world_size, 4,
            "the first attempt runs at the spec's world size"
        );
    }
    for x in &on_a {
        a.started(x).await;
    }
    for x in &on_b {
        b.started(x).await;
    }
    c.wait_state(&job.id, JobState::Running).await;

    b.drop_stream();
    let j = c
        .wait_job(&job.id, "the restart", |j| j.restarts_used == 1)
        .await;
    assert!(j.failure_reason.contains("node-b"), "{}", j.failure_reason);
    match a.next().await {
        coordinator_message::Msg::Cancel(cn) => assert_eq!(cn.epoch, on_a[0].epoch),
        other => panic!("expected a cancel, got {other:?}"),
    }
    for x in &on_a {
        a.report(
            x,
            trainer_report::Body::Exit(TrainerExit {
                success: false,
                code: 143,
                ..Default::default()
            }),
        )
        .await;
    }
    (a, job.id)
}

async fn state_reasons(c: &Coord, id: &str) -> Vec<String> {
    history(c, id)
        .await
        .into_iter()
        .filter_map(|ev| match ev.kind {
            Some(job_event::Kind::State(st)) => Some(st.reason),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn elastic_job_restarts_on_the_ranks_left_after_a_node_is_lost() {
    // The node is lost by its closed session; no heartbeat timeout in the way.
    let c = Coord::start_with(|cfg| cfg.heartbeat_timeout_ms = 60_000).await;
    let (mut a, id) = lose_one_of_two_nodes(&c, &four_ranks(2)).await;

    let mut again: Vec<Assignment> = vec![a.next_assignment().await, a.next_assignment().await];
    again.sort_by_key(|x| x.rank);
    for (rank, x) in again.iter().enumerate() {
        assert_eq!(x.job_id, id);
        assert_eq!(x.rank, rank as u32);
        assert_eq!(x.world_size, 2, "restarted on the 2 devices left: {x:?}");
        assert_eq!(x.epoch, again[0].epoch);
    }
    let mut devices: Vec<u32> = again.iter().map(|x| x.device).collect();
    devices.sort_unstable();
    assert_eq!(devices, [0, 1]);
    let j = c.job(&id).await;
    assert_eq!(j.world_size, 4, "the job's own world size is unchanged");
    assert_eq!(j.placement.len(), 2);

    for x in &again {
        a.started(x).await;
    }
    c.wait_state(&id, JobState::Running).await;
    // Both ranks of the 2-rank attempt report; a rank outside it is fenced off.
    a.report_step(&again[0], 5).await;
    a.report_as(
        &id,
        again[0].epoch,
        2,
        trainer_report::Body::Metrics(Default::default()),
    )
    .await;
    for x in &again {
        a.exit_ok(x).await;
    }
    c.wait_state(&id, JobState::Succeeded).await;

    let reasons = state_reasons(&c, &id).await;
    assert!(
        reasons.iter().any(
            |r| r.starts_with("attempt 2 placed on node-a:0, node-a:1 (elastic: 2 of 4 ranks)")
        ),
        "{reasons:#?}"
    );
    assert!(
        reasons.iter().any(|r| r == "all 2 ranks started"),
        "{reasons:#?}"
    );
}

#[tokio::test]
async fn fixed_size_job_waits_for_its_whole_gang_after_a_node_is_lost() {
    let c = Coord::start_with(|cfg| cfg.heartbeat_timeout_ms = 60_000).await;
    let (mut a, id) = lose_one_of_two_nodes(&c, &four_ranks(0)).await;
    let j = c
        .wait_job(&id, "the pending reason", |j| {
            j.state == JobState::Queued as i32 && j.pending_reason.contains("2 free")
        })
        .await;
    assert_eq!(
        j.pending_reason,
        "needs 4 devices at once; 2 free on 1 online worker"
    );
    // Nothing is placed on the 2 devices left.
    match tokio::time::timeout(Duration::from_millis(500), a.down.message()).await {
        Err(_) => {}
        Ok(m) => panic!("expected nothing for node-a, got {m:?}"),
    }
    assert_eq!(c.job(&id).await.state, JobState::Queued as i32);
}
