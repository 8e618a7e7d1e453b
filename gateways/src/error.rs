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

/// An error with every cause under it, `outer: inner: ...`, for logs:
/// reqwest's own message ("error sending request for url ...") names none
/// of them, and the cause (a timeout, a reset, a closed idle connection)
/// is what an operator needs.
pub struct Causes<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Causes;

    /// Like reqwest's error: a message that names none of its causes.
    #[derive(Debug)]
    struct Sending(std::io::Error);

    impl std::fmt::Display for Sending {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("error sending request")
        }
    }

    impl std::error::Error for Sending {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn every_cause_is_named_in_order() {
        let e = Sending(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        ));
        assert_eq!(
            Causes(&e).to_string(),
            "error sending request: connection reset by peer"
        );
    }
}
