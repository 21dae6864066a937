//! Who may call what. Every RPC passes one tower layer ([`AuthLayer`]) that reads the bearer token,
//! finds its principal (name and role) by SHA-256 hash in constant time, checks the role against
//! the method's entry in [`POLICY`], and hands the principal to the handler in the request's
//! extensions. A method missing from the table is refused to every caller. Tokens are never
//! logged; only their hashes are stored, and the tokens file is re-read when it changes (rotation
//! without a restart).
//!
//! A daemon's identity is bound to its credential: a worker token may name its node
//! (`node = "NAME"` in the tokens file, `add-token --role worker --node NAME`), and with mutual TLS
//! a client certificate whose DNS name is not the fleet name `bt-worker` names the node it was
//! issued to. A bound daemon may register and open sessions only as that node. Handlers refuse a
//! request that carries no principal (the layer is missing): authorization fails closed.
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tracing::{info, warn};

use crate::config::{AuthConfig, AuthMode};

/// A caller's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Submits jobs, cancels its own, reads everything.
    Submitter,
    /// Reads everything (the dashboard's default).
    Viewer,
    /// The `WorkerService` only: what a daemon needs.
    Worker,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Submitter, Role::Viewer, Role::Worker];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submitter => "submitter",
            Role::Viewer => "viewer",
            Role::Worker => "worker",
        }
    }

    /// Whether this role may call a method that needs `access`. Admins may do everything but act
    /// as a daemon: the worker service is for worker credentials only.
    pub fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (_, Access::Open)
                | (Role::Admin, Access::Read | Access::Submit | Access::Admin)
                | (Role::Submitter, Access::Read | Access::Submit)
                | (Role::Viewer, Access::Read)
                | (Role::Worker, Access::Worker)
        )
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role {s:?} (admin, submitter, viewer, worker)"))
    }
}

/// The authenticated caller, in every request's extensions. With authentication off it is an
/// anonymous caller allowed everything (including acting as a daemon).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// The node a worker credential is bound to (a per-node token, or the node named by a
    /// client certificate); None: a fleet credential, or not a worker.
    pub node: Option<String>,
    /// Authentication is off: the caller may do everything.
    pub unchecked: bool,
}

impl Principal {
    /// The caller when authentication is off.
    pub fn anonymous() -> Self {
        Principal {
            name: String::new(),
            role: Role::Admin,
            node: None,
            unchecked: true,
        }
    }

    /// Whether this caller may act as the daemon of the node named `node`: a credential bound to
    /// a node only as that node; the error says which node it is bound to.
    pub fn may_be_node(&self, node: &str) -> Result<(), String> {
        match &self.node {
            Some(bound) if bound != node => Err(format!(
                "this credential is bound to node {bound:?}; it cannot act as node {node:?}"
            )),
            _ => Ok(()),
        }
    }

    /// The owner a cancel or delete is restricted to: submitters may cancel and delete only their
    /// own jobs.
    pub fn cancel_scope(&self) -> Option<&str> {
        (self.role == Role::Submitter).then_some(self.name.as_str())
    }
}

/// What a method needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token (health and reflection, for probes, unless configured otherwise).
    Open,
    /// Read-only client calls.
    Read,
    /// Submitting and cancelling (own jobs for submitters, checked by the handler).
    Submit,
    /// The daemon-facing service.
    Worker,
    /// Cluster operations (draining a worker): admins only.
    Admin,
}

/// Every RPC of bt's own services and what it needs. A new RPC must be added here, or every caller
/// is refused (`tests/it/auth.rs` checks this table against the service descriptors).
pub const POLICY: &[(&str, Access)] = &[
    ("/bt.v1.JobService/SubmitJob", Access::Submit),
    ("/bt.v1.JobService/CancelJob", Access::Submit),
    ("/bt.v1.JobService/GetJob", Access::Read),
    ("/bt.v1.JobService/ListJobs", Access::Read),
    ("/bt.v1.JobService/WatchJob", Access::Read),
    ("/bt.v1.JobService/ListWorkers", Access::Read),
    ("/bt.v1.JobService/ListCheckpoints", Access::Read),
    ("/bt.v1.JobService/StreamLogs", Access::Read),
    ("/bt.v1.JobService/DeleteJob", Access::Submit),
    ("/bt.v1.JobService/DrainWorker", Access::Admin),
    ("/bt.v1.WorkerService/Register", Access::Worker),
    ("/bt.v1.WorkerService/Session", Access::Worker),
];

/// Services open to probes (unless `auth.protect_probes`): health and server reflection.
const PROBE_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The access `path` needs; None: not a method this coordinator knows (refused).
pub fn access_for(path: &str, protect_probes: bool) -> Option<Access> {
    if let Some((_, a)) = POLICY.iter().find(|(p, _)| *p == path) {
        return Some(*a);
    }
    if PROBE_SERVICES.iter().any(|p| path.starts_with(p)) {
        return Some(if protect_probes {
            Access::Read
        } else {
            Access::Open
        });
    }
    None
}

/// The hex SHA-256 of a token, as stored in a tokens file.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// A new random token: `bt_` and 32 random bytes in hex.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("bt_{}", hex::encode(bytes))
}

/// One line of a tokens file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the token (the token itself is never stored).
    pub sha256: String,
    /// For a worker token: the only node it may register as (per-node tokens). Without it, a
    /// worker token is a fleet token: its holder may register as any node not currently online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
}

impl TokenFile {
    pub fn to_toml(&self) -> String {
        let mut s = String::from(
            "# bt access tokens: only their SHA-256 hashes are kept here.\n\
             # Add one with `bt-coordinator add-token --tokens-file THIS --name NAME --role ROLE`.\n",
        );
        s.push_str(&toml::to_string(self).unwrap_or_default());
        s
    }
}

/// Parsed tokens: hash → principal.
#[derive(Debug, Default, Clone)]
pub struct TokenSet {
    entries: Vec<([u8; 32], Principal)>,
}

impl TokenSet {
    /// Parses a tokens file's text; errors name the entry and field (`tokens[2].sha256: ...`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: TokenFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let mut entries = Vec::with_capacity(file.tokens.len());
        let mut names = std::collections::HashSet::new();
        for (i, t) in file.tokens.iter().enumerate() {
            if t.name.trim().is_empty() {
                return Err(format!("tokens[{i}].name: must not be empty"));
            }
            if !names.insert(t.name.clone()) {
                return Err(format!("tokens[{i}].name: {:?} appears twice", t.name));
            }
            let mut hash = [0u8; 32];
            hex::decode_to_slice(t.sha256.trim(), &mut hash).map_err(|_| {
                format!("tokens[{i}].sha256: must be 64 hex digits (the SHA-256 of the token)")
            })?;
            let node = match &t.node {
                Some(_) if t.role != Role::Worker => {
                    return Err(format!(
                        "tokens[{i}].node: only a worker token names a node"
                    ))
                }
                Some(n) if n.trim().is_empty() => {
                    return Err(format!("tokens[{i}].node: must not be empty when set"))
                }
                Some(n) => Some(n.trim().to_string()),
                None => None,
            };
            entries.push((
                hash,
                Principal {
                    name: t.name.clone(),
                    role: t.role,
                    node,
                    unchecked: false,
                },
            ));
        }
        Ok(TokenSet { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The principal of `token`: every stored hash is compared in full, without early exit, so the
    /// time taken does not depend on which entry (if any) matches or where they differ.
    pub fn lookup(&self, token: &str) -> Option<Principal> {
        let presented: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        let mut found: Option<&Principal> = None;
        for (hash, p) in &self.entries {
            let diff = hash
                .iter()
                .zip(presented.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if std::hint::black_box(diff) == 0 {
                found = Some(p);
            }
        }
        found.cloned()
    }
}

struct Loaded {
    set: Arc<TokenSet>,
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

/// How often the tokens file is checked for changes, at most.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Checks calls against the configured tokens.
pub struct Authenticator {
    enabled: bool,
    protect_probes: bool,
    /// Set when mutual TLS is on: daemons must present a client certificate the CA signed.
    require_worker_cert: bool,
    file: Option<PathBuf>,
    /// Tokens from the environment (`auth.tokens`), merged with the file's.
    inline: TokenSet,
    loaded: RwLock<Loaded>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn read_tokens(path: &Path) -> Result<TokenSet, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("auth.tokens_file {}: {e}", path.display()))?;
    TokenSet::parse(&text).map_err(|e| format!("auth.tokens_file {}: {e}", path.display()))
}

impl Authenticator {
    /// From the configuration; refuses to start with authentication on and no token at all.
    pub fn new(cfg: &AuthConfig, require_worker_cert: bool) -> Result<Self, String> {
        let enabled = cfg.mode == AuthMode::On;
        let inline = TokenSet::parse(&cfg.tokens).map_err(|e| format!("auth.tokens: {e}"))?;
        let (set, st) = match &cfg.tokens_file {
            Some(f) if enabled => (read_tokens(f)?, stamp(f)),
            _ => (TokenSet::default(), None),
        };
        if enabled && set.is_empty() && inline.is_empty() {
            return Err(
                "auth: authentication is on but no token is configured; create a tokens \
                        file with `bt-coordinator init-secrets` or `bt-coordinator add-token` and \
                        set auth.tokens_file (--tokens-file), or run with --auth off on a trusted \
                        single-user machine"
                    .into(),
            );
        }
        if enabled {
            info!(
                tokens = set.len() + inline.len(),
                "authentication on (bearer tokens)"
            );
        } else {
            warn!("authentication is OFF: anyone who can reach this port can submit, cancel and act as a daemon");
        }
        Ok(Authenticator {
            enabled,
            protect_probes: cfg.protect_probes,
            require_worker_cert,
            file: cfg.tokens_file.clone().filter(|_| enabled),
            inline,
            loaded: RwLock::new(Loaded {
                set: Arc::new(set),
                stamp: st,
                checked: Instant::now(),
            }),
        })
    }

    /// The current file tokens, re-read when the file changed (checked at most once a second).
    /// A file that no longer parses keeps the previous tokens, with a warning.
    fn file_tokens(&self) -> Arc<TokenSet> {
        {
            let l = self.loaded.read().unwrap_or_else(|p| p.into_inner());
            if l.checked.elapsed() < RELOAD_EVERY || self.file.is_none() {
                return l.set.clone();
            }
        }
        let mut l = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        if l.checked.elapsed() < RELOAD_EVERY {
            return l.set.clone();
        }
        l.checked = Instant::now();
        if let Some(f) = &self.file {
            let st = stamp(f);
            if st != l.stamp {
                match read_tokens(f) {
                    Ok(set) => {
                        info!(file = %f.display(), tokens = set.len(), "tokens file reloaded");
                        l.set = Arc::new(set);
                        l.stamp = st;
                    }
                    Err(e) => {
                        warn!(error = %e, "tokens file changed but does not load; keeping the previous tokens")
                    }
                }
            }
        }
        l.set.clone()
    }

    /// The principal for a call to `path` with these headers, or the status to refuse it with.
    /// Missing or unknown token: `Unauthenticated`; a role that may not call it: `PermissionDenied`.
    /// `client_cert`: whether the caller presented a client certificate (mutual TLS), and the
    /// node it names (its DNS name, unless that is the fleet name `bt-worker`).
    pub fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        client_cert: Option<Option<String>>,
    ) -> Result<Principal, Status> {
        let access = access_for(path, self.protect_probes);
        if access == Some(Access::Worker) && self.require_worker_cert && client_cert.is_none() {
            return Err(Status::unauthenticated(
                "a client certificate is required for the worker service",
            ));
        }
        if !self.enabled {
            return Ok(Principal::anonymous());
        }
        if access == Some(Access::Open) {
            return Ok(Principal {
                name: String::new(),
                role: Role::Viewer,
                node: None,
                unchecked: false,
            });
        }
        let denied = || Status::unauthenticated("authentication required");
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(denied)?;
        let file = self.file_tokens();
        let mut p = match (file.lookup(token), self.inline.lookup(token)) {
            (Some(p), _) | (None, Some(p)) => p,
            (None, None) => return Err(denied()),
        };
        if p.role == Role::Worker {
            // A node named by the certificate binds the session too; a token bound to another
            // node than the certificate names is refused outright.
            if let Some(Some(cert_node)) = client_cert {
                match &p.node {
                    Some(n) if *n != cert_node => {
                        return Err(Status::permission_denied(format!(
                            "the token is bound to node {n:?} but the client certificate names                              node {cert_node:?}"
                        )))
                    }
                    _ => p.node = Some(cert_node),
                }
            }
        }
        match access {
            Some(a) if p.role.allows(a) => Ok(p),
            _ => Err(Status::permission_denied("permission denied")),
        }
    }
}

/// The tower layer that puts [`Authenticator::check`] in front of every service; refusals are
/// counted (by reason only) in `metrics` when given.
#[derive(Clone)]
pub struct AuthLayer {
    pub auth: Arc<Authenticator>,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: self.auth.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// The fleet-wide name of the daemon client certificate `init-secrets` issues: it names no node.
pub const FLEET_CERT_NAME: &str = "bt-worker";

/// The node a client certificate (DER) names: its first DNS name other than the fleet name.
pub fn cert_node(der: &[u8]) -> Option<String> {
    let der = rustls_pki_types::CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    let names: Vec<&str> = cert.valid_dns_names().collect();
    names
        .into_iter()
        .find(|n| *n != FLEET_CERT_NAME)
        .map(str::to_string)
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for AuthService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let client_cert = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs())
            .and_then(|c| c.first().map(|c| cert_node(c.as_ref())));
        match self
            .auth
            .check(req.uri().path(), req.headers(), client_cert)
        {
            Ok(p) => {
                req.extensions_mut().insert(p);
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                if let Some(m) = &self.metrics {
                    m.record_refused(status.code());
                }
                let resp = status.into_http::<RB>();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

/// The caller of a tonic request, set by [`AuthLayer`] (also when authentication is off). A
/// request without one did not pass the layer: it is refused (fail closed), never treated as
/// anyone.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Principal, Status> {
    req.extensions().get::<Principal>().cloned().ok_or_else(|| {
        tracing::error!("a request reached a handler without an authenticated principal; refused");
        Status::unauthenticated("no authenticated caller (the authentication layer is missing)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> TokenSet {
        let f = TokenFile {
            tokens: vec![
                TokenEntry {
                    name: "alice".into(),
                    role: Role::Submitter,
                    sha256: token_hash("tok-a"),
                    node: None,
                },
                TokenEntry {
                    name: "node".into(),
                    role: Role::Worker,
                    sha256: token_hash("tok-w"),
                    node: None,
                },
            ],
        };
        TokenSet::parse(&f.to_toml()).unwrap()
    }

    #[test]
    fn lookup_finds_by_hash_only() {
        let s = set();
        assert_eq!(s.lookup("tok-a").unwrap().name, "alice");
        assert_eq!(s.lookup("tok-w").unwrap().role, Role::Worker);
        assert!(s.lookup("tok-").is_none());
        assert!(s.lookup(&token_hash("tok-a")).is_none());
    }

    #[test]
    fn bad_files_name_the_entry() {
        let e = TokenSet::parse("[[tokens]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"xyz\"\n")
            .unwrap_err();
        assert!(e.starts_with("tokens[0].sha256"), "{e}");
        let e = TokenSet::parse("[[tokens]]\nname = \"a\"\nrole = \"root\"\nsha256 = \"\"\n")
            .unwrap_err();
        assert!(e.contains("root"), "{e}");
    }

    #[test]
    fn roles_and_policy() {
        use Access::*;
        assert!(!Role::Admin.allows(Worker) && Role::Admin.allows(Submit));
        assert!(Role::Submitter.allows(Submit) && Role::Submitter.allows(Read));
        assert!(!Role::Submitter.allows(Worker));
        assert!(Role::Viewer.allows(Read) && !Role::Viewer.allows(Submit));
        assert!(Role::Worker.allows(Worker) && !Role::Worker.allows(Read));
        assert!(Role::Admin.allows(Admin));
        for r in [Role::Submitter, Role::Viewer, Role::Worker] {
            assert!(!r.allows(Admin), "{r:?} may drain workers");
        }
        assert_eq!(
            access_for("/grpc.health.v1.Health/Check", false),
            Some(Open)
        );
        assert_eq!(access_for("/grpc.health.v1.Health/Check", true), Some(Read));
        assert_eq!(access_for("/bt.v1.JobService/Nope", false), None);
        assert_eq!(new_token().len(), 67);
    }
}
