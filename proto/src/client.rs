//! How every bt client (btctl, the worker daemon, tests) reaches the coordinator: one endpoint
//! parser, TLS that verifies the server against a CA, an optional client certificate (mutual TLS
//! for daemons), and a bearer token sent with every call.
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// A channel whose every request carries the bearer token (if any).
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad coordinator address {addr:?}: {message}")]
    Address { addr: String, message: String },
    #[error("{what} {path}: {message}")]
    File {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("cannot reach the coordinator at {addr}: {message}")]
    Connect { addr: String, message: String },
}

/// Where the coordinator is and how to prove who we are (no Debug: it holds the token).
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// `host:port`, `http://host:port` or `https://host:port`.
    pub addr: String,
    /// The bearer token (already read from its file or the environment).
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the coordinator's certificate; implies TLS.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Name to verify in the server's certificate (default: the address's host).
    pub tls_domain: Option<String>,
    pub connect_timeout: Option<Duration>,
}

/// HTTP/2 keepalive of every client channel: a ping this often (also while idle)...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...that must be answered within this, or the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive underneath: probes after this much idle time, then every
/// `TCP_KEEPALIVE_INTERVAL`, `TCP_KEEPALIVE_RETRIES` times.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// The URL for `addr`: a bare `host:port` becomes `https://` when TLS is on, else `http://`.
pub fn endpoint_url(addr: &str, tls: bool) -> String {
    match addr.split_once("://") {
        Some(("http", rest)) if tls => format!("https://{rest}"),
        Some(_) => addr.to_string(),
        None if tls => format!("https://{addr}"),
        None => format!("http://{addr}"),
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::File {
        what,
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Reads a token file: the first non-empty line, trimmed. The token itself never appears in an
/// error.
pub fn read_token_file(path: &Path) -> Result<String, ClientError> {
    let text = String::from_utf8(read("token file", path)?).map_err(|_| ClientError::File {
        what: "token file",
        path: path.display().to_string(),
        message: "is not UTF-8".into(),
    })?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
        .ok_or_else(|| ClientError::File {
            what: "token file",
            path: path.display().to_string(),
            message: "is empty".into(),
        })
}

impl ClientOptions {
    pub fn new(addr: impl Into<String>) -> Self {
        ClientOptions {
            addr: addr.into(),
            ..Default::default()
        }
    }

    pub fn tls(&self) -> bool {
        self.ca_cert.is_some() || self.addr.starts_with("https://")
    }

    /// The endpoint, with TLS configured when asked for.
    pub fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let url = endpoint_url(&self.addr, self.tls());
        let bad = |message: String| ClientError::Address {
            addr: self.addr.clone(),
            message,
        };
        let mut ep = Endpoint::from_shared(url).map_err(|e| bad(e.to_string()))?;
        ep = ep.connect_timeout(self.connect_timeout.unwrap_or(Duration::from_secs(5)));
        // A peer that vanished without a FIN or RST (a node gone, a dropped link) is noticed:
        // HTTP/2 pings every 10 s, idle or not, answered within 10 s; TCP keepalive underneath.
        ep = ep
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(TCP_KEEPALIVE))
            .tcp_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL))
            .tcp_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES));
        if self.tls() {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.ca_cert {
                tls = tls.ca_certificate(Certificate::from_pem(read("CA certificate", ca)?));
            }
            match (&self.client_cert, &self.client_key) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(Identity::from_pem(
                        read("client certificate", c)?,
                        read("client key", k)?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(ClientError::File {
                        what: "client certificate",
                        path: String::new(),
                        message: "a client certificate needs both the certificate and its key"
                            .into(),
                    })
                }
            }
            if let Some(d) = &self.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            ep = ep.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        Ok(ep)
    }

    /// The bearer-token interceptor for these options.
    pub fn bearer(&self) -> Result<BearerToken, ClientError> {
        BearerToken::new(self.token.as_deref())
    }

    /// Connects now (errors name the address).
    pub async fn connect(&self) -> Result<AuthChannel, ClientError> {
        let bearer = self.bearer()?;
        let ch = self
            .endpoint()?
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                addr: self.addr.clone(),
                message: error_chain(&e),
            })?;
        Ok(InterceptedService::new(ch, bearer))
    }

    /// A channel that connects on first use.
    pub fn connect_lazy(&self) -> Result<AuthChannel, ClientError> {
        let bearer = self.bearer()?;
        Ok(InterceptedService::new(
            self.endpoint()?.connect_lazy(),
            bearer,
        ))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Adds `authorization: Bearer <token>` to every request. Its Debug output hides the token.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<set>)"
        } else {
            "BearerToken(<none>)"
        })
    }
}

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        let Some(t) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(BearerToken(None));
        };
        let mut v: MetadataValue<Ascii> =
            format!("Bearer {t}")
                .parse()
                .map_err(|_| ClientError::File {
                    what: "token",
                    path: String::new(),
                    message: "contains characters that cannot go in a header".into(),
                })?;
        v.set_sensitive(true);
        Ok(BearerToken(Some(v)))
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_tls() {
        assert_eq!(endpoint_url("h:1", false), "http://h:1");
        assert_eq!(endpoint_url("h:1", true), "https://h:1");
        assert_eq!(endpoint_url("http://h:1", true), "https://h:1");
        assert_eq!(endpoint_url("https://h:1", false), "https://h:1");
    }

    #[test]
    fn bearer_hides_the_token() {
        let b = BearerToken::new(Some(" secret ")).unwrap();
        assert!(!format!("{b:?}").contains("secret"));
        let mut b2 = b.clone();
        let r = b2.call(Request::new(())).unwrap();
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer secret");
        let r = BearerToken::new(None)
            .unwrap()
            .call(Request::new(()))
            .unwrap();
        assert!(r.metadata().get("authorization").is_none());
    }
}
