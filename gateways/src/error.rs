/// Errors of the gateway layer that are not a client's fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Stage(#[from] imflow_stages::Error),
    #[error("discovery: {0}")]
    Discovery(String),
    #[error("random source: {0}")]
    Random(String),
}
