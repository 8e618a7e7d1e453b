use crate::model::ImError;

/// Errors of the stage layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    /// A cluster backend (MySQL, MongoDB, Redis) failed or is misconfigured;
    /// the message names the setting.
    #[error("{0}")]
    Backend(String),
    #[error("embedded store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("embedded store at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding rows for the store: {0}")]
    Encode(String),
    #[error("the store's writer has stopped")]
    WriterGone,
    /// A commit neither stored a message nor found it stored: a bug in the
    /// commit's statements, reported rather than taken as stored.
    #[error("the history commit dropped message {0}: neither stored nor found")]
    Unstored(String),
    #[error(transparent)]
    Client(#[from] ImError),
}

impl Error {
    /// How a client sees this error.
    pub fn to_client(&self) -> ImError {
        match self {
            Error::Client(e) => e.clone(),
            other => {
                tracing::error!(error = %other, "store error");
                ImError::unavailable("the server could not complete the request; try again")
            }
        }
    }
}

impl From<Error> for ImError {
    fn from(e: Error) -> Self {
        e.to_client()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
