//! The crate's error type and the one place that maps it to gRPC status codes.
use tonic::Status;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("corrupt record in the store: {0}")]
    Corrupt(String),
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Longest status message sent to a peer (bytes). Errors may quote what the peer sent (an id that
/// does not parse); a message of megabytes would go back in the `grpc-message` trailer, which
/// HTTP/2 peers refuse past their header limits (and it would echo the attacker's bulk).
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// `m` cut to [`MAX_STATUS_MESSAGE`] bytes at a character boundary, saying how much was cut.
pub fn bounded_message(m: String) -> String {
    if m.len() <= MAX_STATUS_MESSAGE {
        return m;
    }
    let mut end = MAX_STATUS_MESSAGE;
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &m[..end], m.len() - end)
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let m = bounded_message(e.to_string());
        match &e {
            Error::InvalidArgument { .. } => Status::invalid_argument(m),
            Error::NotFound { .. } => Status::not_found(m),
            Error::FailedPrecondition(_) => Status::failed_precondition(m),
            Error::PermissionDenied(_) => Status::permission_denied(m),
            Error::ResourceExhausted(_) => Status::resource_exhausted(m),
            Error::ShuttingDown => Status::unavailable(m),
            Error::Store(_) | Error::Corrupt(_) | Error::Internal(_) => {
                tracing::error!(error = %e, "internal error");
                Status::internal(m)
            }
        }
    }
}
