//! The tonic services: thin adapters from RPCs to `Core` calls.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bt_common::JobId;
use bt_proto::job_service_server::JobService;
use bt_proto::worker_service_server::WorkerService;
use bt_proto::{
    job_event, CancelJobRequest, CoordinatorMessage, DeleteJobRequest, DeleteJobResponse,
    DrainWorkerRequest, GetJobRequest, Job, JobEvent, ListCheckpointsRequest,
    ListCheckpointsResponse, ListJobsRequest, ListJobsResponse, ListWorkersRequest,
    ListWorkersResponse, LogLine, Missed, RegisterRequest, RegisterResponse, StreamLogsRequest,
    SubmitJobRequest, WatchJobRequest, WorkerMessage, PROTOCOL_VERSION,
};
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::principal;
use crate::core::Core;
use crate::error::Error;
use crate::store::LogQuery;

fn parse_job_id(field: &str, s: &str) -> Result<JobId, Status> {
    s.parse::<JobId>()
        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

#[derive(Clone)]
pub(crate) struct JobSvc {
    pub core: Arc<Core>,
}

impl JobSvc {
    /// A listing's page: (offset from `page_token`, page size capped at `limits.max_page_size`).
    fn page(&self, token: &str, size: u32) -> Result<(usize, usize), Status> {
        let max = self.core.config().limits.max_page_size;
        let offset = match token.trim() {
            "" => 0,
            t => t.parse::<usize>().map_err(|_| {
                Status::invalid_argument(
                    "page_token: not a token this coordinator handed out (pass next_page_token back unchanged)",
                )
            })?,
        };
        let size = match size as usize {
            0 => max,
            s => s.min(max),
        };
        Ok((offset, size))
    }
}

#[tonic::async_trait]
impl JobService for JobSvc {
    async fn submit_job(&self, req: Request<SubmitJobRequest>) -> Result<Response<Job>, Status> {
        let who = principal(&req)?;
        let spec = req.into_inner().spec_toml;
        let owner = who.name.clone();
        let job: Job = self
            .core
            .call(move |c| c.submit(&spec, &owner))
            .await?
            .into();
        info!(job_id = %job.id, name = %job.name, world_size = job.world_size, owner = %who.name,
              "job submitted");
        Ok(Response::new(job))
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        principal(&req)?;
        let id = parse_job_id("job_id", &req.get_ref().job_id)?;
        Ok(Response::new(
            self.core.call(move |c| c.get_job(id)).await?.into(),
        ))
    }

    async fn list_jobs(
        &self,
        req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        principal(&req)?;
        let req = req.into_inner();
        let mut states = Vec::with_capacity(req.states.len());
        for (i, s) in req.states.iter().enumerate() {
            match bt_proto::convert::job_state_from_i32(*s) {
                Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "states[{i}]: unknown job state {s}"
                    )))
                }
                Ok(s) => states.push(s),
            }
        }
        let (offset, size) = self.page(&req.page_token, req.page_size)?;
        // `limit` bounds the whole listing: this page ends at it.
        let size = match req.limit as usize {
            0 => size,
            l => size.min(l.saturating_sub(offset)),
        };
        let jobs = self
            .core
            .call(move |c| c.list_jobs_page(&states, offset, size + 1))
            .await?;
        let more = jobs.len() > size && (req.limit == 0 || offset + size < req.limit as usize);
        Ok(Response::new(ListJobsResponse {
            jobs: jobs.into_iter().take(size).map(Into::into).collect(),
            next_page_token: if more {
                (offset + size).to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn cancel_job(&self, req: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let who = principal(&req)?;
        let req = req.into_inner();
        let id = parse_job_id("job_id", &req.job_id)?;
        let scope = who.cancel_scope().map(str::to_string);
        let job: Job = self
            .core
            .call(move |c| c.cancel(id, &req.reason, scope.as_deref()))
            .await?
            .into();
        info!(job_id = %job.id, by = %who.name, "job cancel requested");
        Ok(Response::new(job))
    }

    type WatchJobStream = ReceiverStream<Result<JobEvent, Status>>;

    async fn watch_job(
        &self,
        req: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        principal(&req)?;
        let req = req.into_inner();
        let id = parse_job_id("job_id", &req.job_id)?;
        let from_step = req.from_step;
        let slot = self.core.watch_slot(id)?;
        let start = self.core.call(move |c| c.watch(id, from_step)).await?;
        // A small hand-off buffer: the per-subscriber bound is the broadcast capacity, so a slow
        // watcher lags (and gets `Missed`) instead of holding anything up.
        let (tx, rx) = mpsc::channel(16);
        let follow = req.follow;
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = 0u64;
            let mut ended = false;
            for ev in start.replay {
                last = last.max(ev.seq);
                ended |= ev.is_terminal();
                if tx.send(Ok(ev.into())).await.is_err() {
                    return;
                }
            }
            let (true, false, Some(mut live)) = (follow, ended, start.live) else {
                return;
            };
            loop {
                // A watcher that went away frees its slot even when the job is quiet.
                let next = tokio::select! {
                    r = live.recv() => r,
                    _ = tx.closed() => return,
                };
                match next {
                    Ok(ev) => {
                        if ev.seq <= last {
                            continue;
                        }
                        last = ev.seq;
                        let terminal = ev.is_terminal();
                        if tx.send(Ok(ev.into())).await.is_err() || terminal {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(count)) => {
                        debug!(job_id = %id, count, "watcher lagged");
                        let missed = JobEvent {
                            seq: 0,
                            time_ms: bt_common::now_ms(),
                            step: 0,
                            job_id: id.to_string(),
                            kind: Some(job_event::Kind::Missed(Missed { count })),
                        };
                        if tx.send(Ok(missed)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_workers(
        &self,
        req: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        principal(&req)?;
        let (offset, size) = self.page(&req.get_ref().page_token, req.get_ref().page_size)?;
        let workers = self.core.call(|c| c.list_workers()).await?;
        let total = workers.len();
        Ok(Response::new(ListWorkersResponse {
            workers: workers
                .into_iter()
                .skip(offset)
                .take(size)
                .map(Into::into)
                .collect(),
            next_page_token: if offset + size < total {
                (offset + size).to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn drain_worker(
        &self,
        req: Request<DrainWorkerRequest>,
    ) -> Result<Response<bt_proto::Worker>, Status> {
        let who = principal(&req)?;
        let req = req.into_inner();
        let reason = if req.reason.trim().is_empty() && !req.undo {
            format!(
                "drained by {}",
                if who.name.is_empty() {
                    "an operator"
                } else {
                    &who.name
                }
            )
        } else {
            req.reason
        };
        let undo = req.undo;
        let w = self
            .core
            .call(move |c| c.drain_worker(&req.worker, &reason, undo))
            .await?;
        info!(worker = %w.worker.name, by = %who.name, undo, "drain request");
        Ok(Response::new(w.into()))
    }

    async fn list_checkpoints(
        &self,
        req: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        principal(&req)?;
        let id = parse_job_id("job_id", &req.get_ref().job_id)?;
        let checkpoints = self.core.call(move |c| c.list_checkpoints(id)).await?;
        Ok(Response::new(ListCheckpointsResponse {
            checkpoints: checkpoints.into_iter().map(Into::into).collect(),
        }))
    }

    type StreamLogsStream = ReceiverStream<Result<LogLine, Status>>;

    async fn stream_logs(
        &self,
        req: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        principal(&req)?;
        let req = req.into_inner();
        let id = parse_job_id("job_id", &req.job_id)?;
        let slot = self.core.watch_slot(id)?;
        let mut ticks = self.core.log_ticks();
        let mut q = LogQuery {
            ranks: req.ranks,
            after: 0,
            tail: u64::from(req.tail),
            limit: LOG_PAGE,
        };
        // The first page now, so an unknown job is an error of the call itself.
        let first = q.clone();
        let (lines, state) = self.core.call(move |c| c.read_logs(id, &first)).await?;
        let (tx, rx) = mpsc::channel(64);
        let core = self.core.clone();
        let follow = req.follow;
        tokio::spawn(async move {
            let _slot = slot;
            let (mut lines, mut finished) = (lines, state.is_terminal());
            q.tail = 0;
            loop {
                let full = lines.len() as u64 >= LOG_PAGE;
                for l in lines {
                    q.after = q.after.max(l.seq);
                    if tx.send(Ok(l.into())).await.is_err() {
                        return;
                    }
                }
                if !full {
                    // Everything persisted so far went out: done, unless following a live job.
                    if finished || !follow {
                        return;
                    }
                    tokio::select! {
                        _ = ticks.changed() => {}
                        _ = tokio::time::sleep(LOG_POLL) => {}
                        _ = tx.closed() => return,
                    }
                }
                let page = q.clone();
                match core.call(move |c| c.read_logs(id, &page)).await {
                    Ok((l, s)) => {
                        lines = l;
                        finished = s.is_terminal();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delete_job(
        &self,
        req: Request<DeleteJobRequest>,
    ) -> Result<Response<DeleteJobResponse>, Status> {
        let who = principal(&req)?;
        let req = req.into_inner();
        let id = parse_job_id("job_id", &req.job_id)?;
        let scope = who.cancel_scope().map(str::to_string);
        let files = req.delete_files;
        let (d, files_removed) = self
            .core
            .call(move |c| c.delete_job(id, files, scope.as_deref()))
            .await?;
        info!(job_id = %id, by = %who.name, files, "job deleted");
        Ok(Response::new(DeleteJobResponse {
            events: d.events,
            checkpoints: d.checkpoints,
            log_lines: d.log_lines,
            files_removed,
        }))
    }
}

/// Log lines read per store query while following.
const LOG_PAGE: u64 = 2000;
/// A follower looks again at least this often (a missed tick costs at most this delay).
const LOG_POLL: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(crate) struct WorkerSvc {
    pub core: Arc<Core>,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerSvc {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let who = principal(&req)?;
        let peer = req.remote_addr();
        let req = req.into_inner();
        let bound = who.node.clone();
        let worker_id = self
            .core
            .call(move |c| c.register(&req, bound.as_deref()))
            .await
            .inspect_err(|e| {
                warn!(peer = ?peer, error = %e, "registration refused");
            })?;
        Ok(Response::new(RegisterResponse {
            worker_id: worker_id.to_string(),
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_ms: self
                .core
                .config()
                .heartbeat_interval_ms
                .min(u32::MAX as u64) as u32,
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let who = principal(&req)?;
        let peer = req.remote_addr();
        let mut inbound = req.into_inner();
        let wait = Duration::from_millis(self.core.config().heartbeat_timeout_ms);
        let first = match tokio::time::timeout(wait, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no hello within the heartbeat timeout",
                ))
            }
            Ok(Err(s)) => return Err(Status::invalid_argument(format!("msg: {}", s.message()))),
            Ok(Ok(None)) => {
                return Err(Status::invalid_argument(
                    "msg: the stream ended before a hello",
                ))
            }
            Ok(Ok(Some(m))) => m,
        };
        if let Some(bound) = who.node.clone() {
            // A credential bound to a node opens sessions only as that node's worker.
            let id = match &first.msg {
                Some(bt_proto::worker_message::Msg::Hello(h)) => h.worker_id.clone(),
                _ => String::new(),
            };
            let name = self.core.call(move |c| c.worker_name(&id)).await?;
            if let Some(name) = name.filter(|n| *n != bound) {
                warn!(peer = ?peer, bound = %bound, worker = %name,
                      "a session for another node's worker refused");
                return Err(Status::permission_denied(format!(
                    "hello.worker_id: this credential is bound to node {bound:?}; it cannot open \
                     a session as worker {name:?}"
                )));
            }
        }
        let opened = self
            .core
            .call(move |c| c.open_session(Some(first)))
            .await
            .inspect_err(|e| warn!(peer = ?peer, error = %e, "session refused"))?;
        let core = self.core.clone();
        let (worker_id, conn_id, kill) = (opened.worker_id, opened.conn_id, opened.kill.clone());
        let name = opened.worker_name.clone();
        tokio::spawn(async move {
            let reason = loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = kill.notified() => break None,
                };
                match next {
                    Ok(Some(msg)) => {
                        match core
                            .call(move |c| c.handle_message(worker_id, conn_id, msg))
                            .await
                        {
                            Ok(()) => {}
                            Err(Error::ShuttingDown) => break None,
                            Err(e) => {
                                warn!(worker = %name, error = %e, "bad message; closing the session");
                                break Some(format!("bad message: {e}"));
                            }
                        }
                    }
                    Ok(None) => {
                        break Some("the session stream was closed by the worker".to_string())
                    }
                    Err(s) => break Some(format!("session stream error: {}", s.message())),
                }
            };
            if let Some(reason) = reason {
                let r = reason.clone();
                if let Err(e) = core
                    .call(move |c| c.session_closed(worker_id, conn_id, &r))
                    .await
                {
                    warn!(worker = %name, error = %e, "handling a closed session failed");
                }
                debug!(worker = %name, reason, "session reader ended");
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            opened.rx,
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthConfig, AuthMode, CoordinatorConfig};
    use bt_proto::job_service_server::JobServiceServer;
    use bt_proto::worker_service_server::WorkerServiceServer;
    use tokio_stream::wrappers::TcpListenerStream;

    /// Authorization fails closed: served without the authentication layer (so no request carries
    /// a principal), every method of both services is refused as unauthenticated, none is served
    /// as if by an admin.
    #[tokio::test]
    async fn without_the_auth_layer_every_call_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = CoordinatorConfig {
            db_path: dir.path().join("state.db"),
            checkpoint_root: dir.path().join("ckpt"),
            auth: AuthConfig {
                mode: AuthMode::Off,
                ..Default::default()
            },
            ..Default::default()
        };
        let store = crate::store::SqliteStore::open(&config.db_path).unwrap();
        let core = Core::new(config, Box::new(store)).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(JobServiceServer::new(JobSvc { core: core.clone() }))
            .add_service(WorkerServiceServer::new(WorkerSvc { core }))
            .serve_with_incoming(TcpListenerStream::new(l));
        let task = tokio::spawn(server);
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        type Empty = ();
        for (path, _) in crate::auth::POLICY {
            let mut grpc = tonic::client::Grpc::new(ch.clone());
            grpc.ready().await.unwrap();
            let p: http::uri::PathAndQuery = path.parse().unwrap();
            let codec = tonic_prost::ProstCodec::<Empty, Empty>::default();
            let r = if path.ends_with("/Session") {
                let up = tokio_stream::iter(Vec::<Empty>::new());
                grpc.streaming(tonic::Request::new(up), p, codec)
                    .await
                    .map(|_| ())
            } else if path.ends_with("/WatchJob") || path.ends_with("/StreamLogs") {
                grpc.server_streaming(tonic::Request::new(()), p, codec)
                    .await
                    .map(|_| ())
            } else {
                grpc.unary(tonic::Request::new(()), p, codec)
                    .await
                    .map(|_| ())
            };
            let code = r.map_or_else(|s| s.code(), |_| tonic::Code::Ok);
            assert_eq!(code, tonic::Code::Unauthenticated, "{path}");
        }
        task.abort();
    }
}
