use std::fmt;

/// One problem found in a pipeline file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file as the user named it.
    pub file: String,
    /// 1-based line, when the path could be found in the file.
    pub line: Option<usize>,
    /// Dotted path of the offending node, e.g. `stages.fanout.inputs[0]`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}: {}", self.file, line, self.path, self.message),
            None => write!(f, "{}: {}: {}", self.file, self.path, self.message),
        }
    }
}

/// Every problem found while compiling a pipeline: compilation does not stop at
/// the first one, so a user fixes the file in one pass.
#[derive(Debug, Clone, thiserror::Error)]
pub struct CompileErrors(pub Vec<Diagnostic>);

impl fmt::Display for CompileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} error{} in the pipeline:",
            if n == 1 { "" } else { "s" }
        )?;
        for d in &self.0 {
            writeln!(f, "  {d}")?;
        }
        Ok(())
    }
}

/// A compiled pipeline could not be turned into running tasks.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("stage `{stage}`: {message}")]
    Stage { stage: String, message: String },
    #[error("stage `{stage}` asked for {what} of type `{wanted}`, but the graph carries `{actual}` there")]
    PortType {
        stage: String,
        what: &'static str,
        wanted: &'static str,
        actual: &'static str,
    },
    /// Stages whose needs this process does not meet, each as
    /// `(stage, kind, role)`; all of them, so one start names every gap.
    #[error("this process lacks what its stages need: {}", missing_list(.0))]
    MissingRoles(Vec<(String, String, &'static str)>),
}

fn missing_list(missing: &[(String, String, &'static str)]) -> String {
    missing
        .iter()
        .map(|(stage, kind, role)| format!("stage `{stage}` (kind `{kind}`) needs `{role}`"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl BuildError {
    pub fn stage(stage: impl Into<String>, message: impl fmt::Display) -> Self {
        BuildError::Stage {
            stage: stage.into(),
            message: message.to_string(),
        }
    }
}
