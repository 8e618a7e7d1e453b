//! Finds the line of a dotted path (`stages.fanout.inputs[1]`) in YAML text.
//!
//! serde_yaml does not keep source positions, and error messages must say
//! where a problem is. Pipeline files are block-style YAML written by people,
//! so an indentation-based scan is enough: it understands `key:` lines and
//! `- ` list items, and falls back to the nearest ancestor it can find.

use std::collections::HashMap;

pub struct Locator {
    lines: HashMap<String, usize>,
}

impl Locator {
    pub fn new(text: &str) -> Self {
        let mut lines = HashMap::new();
        // (indent, path) of the open mappings / items above the current line.
        let mut stack: Vec<(usize, String)> = Vec::new();
        let mut item_counts: HashMap<String, usize> = HashMap::new();
        for (no, raw) in text.lines().enumerate() {
            let line_no = no + 1;
            let content = strip_comment(raw);
            if content.trim().is_empty() || content.trim_start().starts_with("---") {
                continue;
            }
            let mut indent = content.len() - content.trim_start().len();
            let mut rest = content.trim_start();
            while let Some(item) =
                rest.strip_prefix("- ")
                    .or(if rest == "-" { Some("") } else { None })
            {
                while stack.last().is_some_and(|(i, _)| *i >= indent) {
                    stack.pop();
                }
                let parent = stack.last().map(|(_, p)| p.clone()).unwrap_or_default();
                let idx = item_counts.entry(parent.clone()).or_insert(0);
                let path = format!("{parent}[{idx}]");
                *idx += 1;
                lines.entry(path.clone()).or_insert(line_no);
                stack.push((indent, path));
                indent += 2;
                rest = item.trim_start();
                if rest.is_empty() {
                    break;
                }
            }
            if let Some(key) = leading_key(rest) {
                while stack.last().is_some_and(|(i, _)| *i >= indent) {
                    stack.pop();
                }
                let path = match stack.last() {
                    Some((_, p)) if !p.is_empty() => format!("{p}.{key}"),
                    _ => key.to_string(),
                };
                lines.entry(path.clone()).or_insert(line_no);
                item_counts.remove(&path);
                stack.push((indent, path));
            }
        }
        Locator { lines }
    }

    /// The line of `path`, or of its nearest ancestor that appears in the text.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

fn strip_comment(line: &str) -> &str {
    let mut in_single = false;
    let mut in_double = false;
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !in_double => in_single = !in_single,
            '"' if !in_single => in_double = !in_double,
            '#' if !in_single && !in_double && (i == 0 || line[..i].ends_with(' ')) => {
                return &line[..i];
            }
            _ => {}
        }
    }
    line
}

fn leading_key(s: &str) -> Option<&str> {
    let colon = s.find(':')?;
    let after = &s[colon + 1..];
    if !(after.is_empty() || after.starts_with(' ')) {
        return None;
    }
    let key = s[..colon].trim().trim_matches(|c| c == '"' || c == '\'');
    if key.is_empty() || key.contains(['{', '[', ',']) {
        None
    } else {
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# comment
stages:
  ingest:
    kind: ingest
  seq:
    kind: seq-assign
    inputs:
      - from: ingest   # the gateway side
        topic: ws2ms_chat
      - other
    options:
      batch: 3
  push:
    kind: push
    inputs: [seq]
";

    #[test]
    fn finds_keys_and_list_items() {
        let l = Locator::new(TEXT);
        assert_eq!(l.line("stages"), Some(2));
        assert_eq!(l.line("stages.seq.kind"), Some(6));
        assert_eq!(l.line("stages.seq.inputs[0]"), Some(8));
        assert_eq!(l.line("stages.seq.inputs[0].topic"), Some(9));
        assert_eq!(l.line("stages.seq.inputs[1]"), Some(10));
        assert_eq!(l.line("stages.seq.options.batch"), Some(12));
        assert_eq!(l.line("stages.push.kind"), Some(14));
    }

    #[test]
    fn falls_back_to_the_nearest_ancestor() {
        let l = Locator::new(TEXT);
        assert_eq!(l.line("stages.push.inputs[0]"), Some(15));
        assert_eq!(l.line("stages.push.options.x"), Some(13));
    }
}
