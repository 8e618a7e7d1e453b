//! From pipeline text to a checked graph.
//!
//! Every problem is collected before anything is reported, each with the line
//! and path where it is: unknown kinds, inputs naming no stage, duplicate
//! names, bad options, type mismatches on edges, and cycles.

use std::collections::HashMap;
use std::fmt;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::config::{PipelineSpec, ProcessSpec, StageSpec};
use crate::error::{CompileErrors, Diagnostic};
use crate::locate::Locator;
use crate::registry::{PortType, Registry};
use crate::resources::RoleId;

/// Default bound of an in-memory partition queue.
pub const DEFAULT_CAPACITY: u32 = 4096;
const MAX_PARTITIONS: u32 = 1024;

#[derive(Debug, Clone)]
pub struct StageNode {
    pub name: String,
    pub kind: String,
    pub options: serde_yaml::Value,
    pub input: Option<PortType>,
    pub output: Option<PortType>,
    /// What the kind declared it takes from, and gives to, its process.
    pub needs: Vec<RoleId>,
    pub provides: Vec<RoleId>,
}

#[derive(Debug, Clone)]
pub struct EdgeInfo {
    pub topic: Option<String>,
    pub partitions: u32,
    pub capacity: u32,
    /// The type carried, by port name.
    pub carries: &'static str,
}

/// Names the doors' process kinds take; a stage group may not use them.
pub const DOOR_PROCESSES: [&str; 2] = ["gateway", "api"];

/// A process group: stages placed together in one OS process kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessGroup {
    pub name: String,
    pub stages: Vec<String>,
    /// One port per process; empty when the group gives a `count`.
    pub ports: Vec<u16>,
    pub count: u32,
}

impl ProcessGroup {
    /// How many processes of this kind each host runs.
    pub fn instances(&self) -> u32 {
        if self.ports.is_empty() {
            self.count
        } else {
            self.ports.len() as u32
        }
    }

    /// The port of process `index`, if the group gives ports.
    pub fn port(&self, index: u32) -> Option<u16> {
        self.ports.get(index as usize).copied()
    }
}

/// A pipeline that passed every check; its stages in dependency order.
#[derive(Debug, Clone)]
pub struct CompiledPipeline {
    pub file: String,
    pub graph: DiGraph<StageNode, EdgeInfo>,
    pub order: Vec<NodeIndex>,
    /// The `processes:` section, in file order; empty when the file has
    /// none (every stage in one process).
    pub processes: Vec<ProcessGroup>,
}

/// The stages two versions of a pipeline run differently, by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StageDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
}

impl StageDiff {
    /// Nothing to restart.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl CompiledPipeline {
    pub fn stage_count(&self) -> usize {
        self.graph.node_count()
    }

    pub fn edge_count(&self) -> usize {
        self.graph.edge_count()
    }

    pub fn process(&self, name: &str) -> Option<&ProcessGroup> {
        self.processes.iter().find(|p| p.name == name)
    }

    /// The process group a stage is placed in.
    pub fn process_of(&self, stage: &str) -> Option<&ProcessGroup> {
        self.processes
            .iter()
            .find(|p| p.stages.iter().any(|s| s == stage))
    }

    /// The stages a process runs: those of `group`, or every stage when
    /// `group` is `None` (one process runs the whole pipeline).
    pub fn stages_of<'a>(&'a self, group: Option<&'a str>) -> impl Iterator<Item = &'a StageNode> {
        let placed = group.map(|g| self.process(g).map(|p| p.stages.as_slice()).unwrap_or(&[]));
        self.graph
            .node_weights()
            .filter(move |n| placed.is_none_or(|stages| stages.contains(&n.name)))
    }

    /// Whether a stage of `group` (of the whole pipeline for `None`) needs
    /// `role`: how a process decides what to open before building.
    pub fn needs(&self, group: Option<&str>, role: RoleId) -> bool {
        self.stages_of(group).any(|n| n.needs.contains(&role))
    }

    /// Whether a stage of `group` (of the whole pipeline for `None`)
    /// provides `role`.
    pub fn provides(&self, group: Option<&str>, role: RoleId) -> bool {
        self.stages_of(group).any(|n| n.provides.contains(&role))
    }

    /// How the stages of `group` (all for `None`) differ from `older`'s:
    /// what a live reload starts, stops and rebuilds. A stage is changed
    /// when its kind, options or any edge into or out of it (peer, topic,
    /// partitions, capacity) differ.
    pub fn diff(&self, older: &CompiledPipeline, group: Option<&str>) -> StageDiff {
        let mine: HashMap<&str, String> = self
            .stages_of(group)
            .map(|n| (n.name.as_str(), self.signature(&n.name)))
            .collect();
        let theirs: HashMap<&str, String> = older
            .stages_of(group)
            .map(|n| (n.name.as_str(), older.signature(&n.name)))
            .collect();
        let mut d = StageDiff::default();
        for (name, sig) in &mine {
            match theirs.get(name) {
                None => d.added.push(name.to_string()),
                Some(old) if old != sig => d.changed.push(name.to_string()),
                Some(_) => d.unchanged.push(name.to_string()),
            }
        }
        d.removed = theirs
            .keys()
            .filter(|n| !mine.contains_key(*n))
            .map(|n| n.to_string())
            .collect();
        for v in [
            &mut d.added,
            &mut d.removed,
            &mut d.changed,
            &mut d.unchanged,
        ] {
            v.sort();
        }
        d
    }

    /// Every edge as (source stage, target stage, edge).
    pub fn edges(&self) -> impl Iterator<Item = (&str, &str, &EdgeInfo)> {
        self.graph.edge_references().map(|e| {
            (
                self.graph[e.source()].name.as_str(),
                self.graph[e.target()].name.as_str(),
                e.weight(),
            )
        })
    }

    /// Why `self` cannot replace `older` while their Kafka topics hold
    /// records: an edge moved to another topic (records still unread in the
    /// old one would be stranded, acked messages lost) or a topic read by a
    /// stage of another name (its consumer group is named after the stage,
    /// so a new one would start from the earliest record and deliver again).
    pub fn kafka_moves(&self, older: &CompiledPipeline) -> Vec<String> {
        let edges = |p: &CompiledPipeline| -> Vec<(String, String, Option<String>)> {
            p.edges()
                .map(|(from, to, w)| (from.to_string(), to.to_string(), w.topic.clone()))
                .collect()
        };
        let (mine, theirs) = (edges(self), edges(older));
        let mut why = Vec::new();
        for (from, to, topic) in &theirs {
            let Some(topic) = topic else { continue };
            if let Some((_, _, now)) = mine.iter().find(|(f, t, _)| f == from && t == to) {
                if now.as_ref() != Some(topic) {
                    why.push(format!(
                        "{}: the edge `{from}` -> `{to}` would move from topic `{topic}` to {}; records not yet read from `{topic}` would be left there. Keep the topic, or stop the pipeline's writers, let `{to}` drain `{topic}`, and restart",
                        self.file,
                        now.as_ref().map_or("memory".to_string(), |t| format!("`{t}`"))
                    ));
                }
            }
            let readers: Vec<&String> = mine
                .iter()
                .filter(|(_, _, t)| t.as_ref() == Some(topic))
                .map(|(_, t, _)| t)
                .collect();
            if !readers.is_empty() && !readers.contains(&to) {
                why.push(format!(
                    "{}: topic `{topic}` would be read by `{}` instead of `{to}`; its consumer group is named after the stage, so the new one would start from the earliest record and deliver again what `{to}` did. Keep the stage's name",
                    self.file, readers[0]
                ));
            }
        }
        why.sort();
        why.dedup();
        why
    }

    /// Everything that makes a stage what it runs as, as comparable text.
    fn signature(&self, stage: &str) -> String {
        let Some(idx) = self
            .graph
            .node_indices()
            .find(|i| self.graph[*i].name == stage)
        else {
            return String::new();
        };
        let n = &self.graph[idx];
        let options = serde_yaml::to_string(&n.options).unwrap_or_default();
        let mut edges: Vec<String> = self
            .graph
            .edges_directed(idx, petgraph::Direction::Incoming)
            .map(|e| (e, "in", &self.graph[e.source()].name))
            .chain(
                self.graph
                    .edges_directed(idx, petgraph::Direction::Outgoing)
                    .map(|e| (e, "out", &self.graph[e.target()].name)),
            )
            .map(|(e, dir, peer)| {
                let w = e.weight();
                format!("{dir} {peer} {:?} {} {}", w.topic, w.partitions, w.capacity)
            })
            .collect();
        edges.sort();
        format!("{}\n{options}\n{}", n.kind, edges.join("\n"))
    }

    /// The graph in Graphviz DOT.
    pub fn to_dot(&self) -> String {
        let mut out =
            String::from("digraph imflow {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
        for idx in &self.order {
            let n = &self.graph[*idx];
            if self.process_of(&n.name).is_some() {
                continue;
            }
            out.push_str(&format!(
                "  {} [label=\"{}\\n({})\"];\n",
                dot_id(&n.name),
                n.name,
                n.kind
            ));
        }
        for (i, p) in self.processes.iter().enumerate() {
            let ports = if p.ports.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = p.ports.iter().map(u16::to_string).collect();
                format!(" ports {}", list.join(","))
            };
            out.push_str(&format!(
                "  subgraph cluster_{i} {{\n    label=\"{} ×{}{}\";\n    style=dashed;\n",
                p.name,
                p.instances(),
                ports
            ));
            for s in &p.stages {
                if let Some(n) = self.graph.node_weights().find(|n| n.name == *s) {
                    out.push_str(&format!(
                        "    {} [label=\"{}\\n({})\"];\n",
                        dot_id(&n.name),
                        n.name,
                        n.kind
                    ));
                }
            }
            out.push_str("  }\n");
        }
        for e in self.graph.edge_references() {
            let from = &self.graph[e.source()].name;
            let to = &self.graph[e.target()].name;
            let w = e.weight();
            let via = match &w.topic {
                Some(t) => format!("kafka {t} ×{}", w.partitions),
                None => format!("memory ×{}", w.partitions),
            };
            out.push_str(&format!(
                "  {} -> {} [label=\"{}\\n{}\"];\n",
                dot_id(from),
                dot_id(to),
                w.carries,
                via
            ));
        }
        out.push_str("}\n");
        out
    }
}

fn dot_id(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\\\""))
}

impl fmt::Display for CompiledPipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self
            .order
            .iter()
            .map(|i| self.graph[*i].name.as_str())
            .collect();
        write!(
            f,
            "{}: ok, {} stages, {} edges: {}",
            self.file,
            self.stage_count(),
            self.edge_count(),
            names.join(" -> ")
        )?;
        for p in &self.processes {
            write!(
                f,
                "\n  process {} ×{}: {}",
                p.name,
                p.instances(),
                p.stages.join(", ")
            )?;
            if !p.ports.is_empty() {
                let ports: Vec<String> = p.ports.iter().map(u16::to_string).collect();
                write!(f, " (ports {})", ports.join(", "))?;
            }
        }
        Ok(())
    }
}

/// Top level of the file, keeping every `stages` entry even when a name
/// repeats (serde_yaml's own map would stop at the first duplicate).
struct RawFile {
    top: Vec<(String, serde_yaml::Value)>,
    stages: Option<Vec<(serde_yaml::Value, serde_yaml::Value)>>,
    processes: Option<Vec<(serde_yaml::Value, serde_yaml::Value)>>,
}

struct Entries(Vec<(serde_yaml::Value, serde_yaml::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of stage names to stages")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = map.next_entry()? {
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
            fn visit_unit<E>(self) -> Result<Entries, E> {
                Ok(Entries(Vec::new()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawFile;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping with a `stages` key")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawFile, A::Error> {
                let mut raw = RawFile {
                    top: Vec::new(),
                    stages: None,
                    processes: None,
                };
                while let Some(key) = map.next_key::<String>()? {
                    if key == "stages" {
                        raw.stages = Some(map.next_value::<Entries>()?.0);
                    } else if key == "processes" {
                        raw.processes = Some(map.next_value::<Entries>()?.0);
                    } else {
                        raw.top.push((key, map.next_value()?));
                    }
                }
                Ok(raw)
            }
        }
        d.deserialize_map(V)
    }
}

struct Ctx<'a> {
    file: &'a str,
    locator: Locator,
    errors: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        self.errors.push(Diagnostic {
            file: self.file.to_string(),
            line: self.locator.line(&path),
            path,
            message: message.into(),
        });
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Parse the stage list out of the text, reporting per-stage decode errors.
fn parse(text: &str, cx: &mut Ctx<'_>) -> Option<PipelineSpec> {
    let raw: RawFile = match serde_yaml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let line = e.location().map(|l| l.line());
            cx.errors.push(Diagnostic {
                file: cx.file.to_string(),
                line,
                path: "(file)".into(),
                message: format!("not a valid pipeline file: {e}"),
            });
            return None;
        }
    };
    for (key, _) in &raw.top {
        if key != "version" {
            cx.err(
                key.clone(),
                format!(
                    "unknown top-level key `{key}`; expected `stages` (and optionally `version`, `processes`)"
                ),
            );
        }
    }
    if let Some((_, v)) = raw.top.iter().find(|(k, _)| k == "version") {
        if v.as_u64() != Some(1) {
            cx.err("version", "only `version: 1` is understood by this imflow");
        }
    }
    let Some(entries) = raw.stages else {
        cx.err(
            "stages",
            "the file has no `stages:` section; declare at least one stage",
        );
        return None;
    };
    let mut spec = PipelineSpec::default();
    for (k, v) in entries {
        let Some(name) = k.as_str().map(str::to_string) else {
            cx.err(
                "stages",
                format!("stage names must be strings, found {k:?}"),
            );
            continue;
        };
        let path = format!("stages.{name}");
        if !valid_name(&name) {
            cx.err(
                &*path,
                format!("stage name `{name}` must be 1-64 characters of a-z A-Z 0-9 - _"),
            );
        }
        match serde_yaml::from_value::<StageSpec>(v) {
            Ok(s) => spec.stages.push((name, s)),
            Err(e) => cx.err(path, format!("{e}")),
        }
    }
    for (k, v) in raw.processes.unwrap_or_default() {
        let Some(name) = k.as_str().map(str::to_string) else {
            cx.err(
                "processes",
                format!("process names must be strings, found {k:?}"),
            );
            continue;
        };
        let path = format!("processes.{name}");
        match serde_yaml::from_value::<ProcessSpec>(v) {
            Ok(p) => spec.processes.push((name, p)),
            Err(e) => cx.err(path, format!("{e}")),
        }
    }
    Some(spec)
}

/// Check the `processes:` section against the graph: every stage placed in
/// exactly one group, sizes given one way, ports unique, and no in-memory
/// edge crossing from one process to another (only Kafka can carry it).
fn check_processes(
    spec: &PipelineSpec,
    graph: &DiGraph<StageNode, EdgeInfo>,
    cx: &mut Ctx<'_>,
) -> Vec<ProcessGroup> {
    let mut groups = Vec::new();
    if spec.processes.is_empty() {
        return groups;
    }
    let mut placed: HashMap<&str, &str> = HashMap::new();
    let mut ports: HashMap<u16, String> = HashMap::new();
    for (name, p) in &spec.processes {
        let path = format!("processes.{name}");
        if !valid_name(name) {
            cx.err(
                &*path,
                format!("process name `{name}` must be 1-64 characters of a-z A-Z 0-9 - _"),
            );
        }
        if DOOR_PROCESSES.contains(&name.as_str()) {
            cx.err(
                &*path,
                format!("`{name}` is the name of a door process (gateway, api); give this group another name"),
            );
        }
        if groups.iter().any(|g: &ProcessGroup| g.name == *name) {
            cx.err(
                &*path,
                format!("process `{name}` is declared more than once"),
            );
            continue;
        }
        if p.stages.is_empty() {
            cx.err(
                format!("{path}.stages"),
                "a process group needs at least one stage",
            );
        }
        for (i, s) in p.stages.iter().enumerate() {
            if !graph.node_weights().any(|n| n.name == *s) {
                cx.err(
                    format!("{path}.stages[{i}]"),
                    format!("`{s}` names no stage"),
                );
            } else if let Some(other) = placed.insert(s.as_str(), name.as_str()) {
                cx.err(
                    format!("{path}.stages[{i}]"),
                    format!("stage `{s}` is already placed in process `{other}`; a stage runs in one process group"),
                );
            }
        }
        let count = match (&p.ports, p.count) {
            (Some(_), Some(_)) => {
                cx.err(
                    &*path,
                    "give either `ports` (one process per port) or `count`, not both",
                );
                0
            }
            (None, None) => {
                cx.err(
                    &*path,
                    "give `ports: [..]` (one process per port) or `count: N`",
                );
                0
            }
            (Some(list), None) => {
                if list.is_empty() {
                    cx.err(format!("{path}.ports"), "give at least one port");
                }
                for (i, port) in list.iter().enumerate() {
                    if *port == 0 {
                        cx.err(format!("{path}.ports[{i}]"), "port 0 is not a port");
                    } else if let Some(other) = ports.insert(*port, name.clone()) {
                        cx.err(
                            format!("{path}.ports[{i}]"),
                            format!("port {port} is already used by process `{other}`"),
                        );
                    }
                }
                list.len() as u32
            }
            (None, Some(n)) => {
                if n == 0 || n > 256 {
                    cx.err(format!("{path}.count"), "count must be between 1 and 256");
                }
                n
            }
        };
        groups.push(ProcessGroup {
            name: name.clone(),
            stages: p.stages.clone(),
            ports: p.ports.clone().unwrap_or_default(),
            count,
        });
    }
    for n in graph.node_weights() {
        if !placed.contains_key(n.name.as_str()) {
            let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
            cx.err(
                format!("stages.{}", n.name),
                format!(
                    "stage `{}` is placed in no process; add it to the stages of one of: {}",
                    n.name,
                    names.join(", ")
                ),
            );
        }
    }
    for e in graph.edge_references() {
        let from = &graph[e.source()].name;
        let to = &graph[e.target()].name;
        let (Some(a), Some(b)) = (placed.get(from.as_str()), placed.get(to.as_str())) else {
            continue;
        };
        if a != b && e.weight().topic.is_none() {
            let i = spec
                .stages
                .iter()
                .find(|(n, _)| n == to)
                .and_then(|(_, s)| s.inputs.iter().position(|inp| inp.edge().from == *from))
                .unwrap_or(0);
            cx.err(
                format!("stages.{to}.inputs[{i}]"),
                format!(
                    "the in-memory edge {from} -> {to} crosses from process `{a}` to process `{b}`; give it a Kafka `topic` or place both stages in one process"
                ),
            );
        }
    }
    groups
}

/// Compile pipeline text. `file` is how the file is named in messages.
pub fn compile(
    file: &str,
    text: &str,
    registry: &Registry,
) -> Result<CompiledPipeline, CompileErrors> {
    let mut cx = Ctx {
        file,
        locator: Locator::new(text),
        errors: Vec::new(),
    };
    let spec = parse(text, &mut cx);
    let Some(spec) = spec else {
        return Err(CompileErrors(cx.errors));
    };
    let mut graph: DiGraph<StageNode, EdgeInfo> = DiGraph::new();
    let mut index: HashMap<String, NodeIndex> = HashMap::new();

    for (name, stage) in &spec.stages {
        let path = format!("stages.{name}");
        if index.contains_key(name) {
            cx.err(
                &*path,
                format!("stage name `{name}` is used more than once; give each stage its own name"),
            );
            continue;
        }
        let (input, output, needs, provides) = match registry.get(&stage.kind) {
            Some(kind) => {
                for e in kind.check_options(&stage.options) {
                    let p = if e.field.is_empty() {
                        format!("{path}.options")
                    } else {
                        format!("{path}.options.{}", e.field)
                    };
                    cx.err(
                        p,
                        format!("bad option for kind `{}`: {}", stage.kind, e.message),
                    );
                }
                (kind.input(), kind.output(), kind.needs(), kind.provides())
            }
            None => {
                let known: Vec<&str> = registry.kinds().collect();
                cx.err(
                    format!("{path}.kind"),
                    format!(
                        "unknown stage kind `{}`; known kinds: {}",
                        stage.kind,
                        known.join(", ")
                    ),
                );
                (None, None, Vec::new(), Vec::new())
            }
        };
        let idx = graph.add_node(StageNode {
            name: name.clone(),
            kind: stage.kind.clone(),
            options: stage.options.clone(),
            input,
            output,
            needs,
            provides,
        });
        index.insert(name.clone(), idx);
    }

    let mut topics: HashMap<String, String> = HashMap::new();
    for (name, stage) in &spec.stages {
        let Some(&to) = index.get(name) else { continue };
        let known_kind = registry.get(&stage.kind).is_some();
        let consumer = graph[to].clone();
        if known_kind && consumer.input.is_none() && !stage.inputs.is_empty() {
            cx.err(
                format!("stages.{name}.inputs"),
                format!(
                    "kind `{}` is a source and takes no inputs; remove `inputs`",
                    stage.kind
                ),
            );
            continue;
        }
        if known_kind && consumer.input.is_some() && stage.inputs.is_empty() {
            cx.err(
                format!("stages.{name}"),
                format!(
                    "kind `{}` needs an input carrying `{}`; add `inputs: [STAGE]`",
                    stage.kind,
                    consumer.input.map(|p| p.name).unwrap_or("?")
                ),
            );
        }
        for (i, input) in stage.inputs.iter().enumerate() {
            let path = format!("stages.{name}.inputs[{i}]");
            let edge = input.edge();
            let Some(&from) = index.get(&edge.from) else {
                let names: Vec<&str> = spec.stages.iter().map(|(n, _)| n.as_str()).collect();
                cx.err(
                    path,
                    format!(
                        "input `{}` names no stage; stages are: {}",
                        edge.from,
                        names.join(", ")
                    ),
                );
                continue;
            };
            let producer = graph[from].clone();
            let carries = match (producer.output, consumer.input) {
                (None, _) if registry.get(&producer.kind).is_some() => {
                    cx.err(
                        &*path,
                        format!(
                            "stage `{}` (kind `{}`) is a sink and produces nothing to consume",
                            producer.name, producer.kind
                        ),
                    );
                    continue;
                }
                (Some(out), Some(inp)) if !out.same_as(&inp) => {
                    cx.err(
                        &*path,
                        format!(
                            "type mismatch: `{}` (kind `{}`) produces `{}` but `{}` (kind `{}`) takes `{}`",
                            producer.name, producer.kind, out.name, name, stage.kind, inp.name
                        ),
                    );
                    continue;
                }
                (Some(out), _) => out.name,
                _ => "?",
            };
            let partitions = edge.partitions.unwrap_or(1);
            if partitions == 0 || partitions > MAX_PARTITIONS {
                cx.err(
                    format!("{path}.partitions"),
                    format!(
                        "partitions must be between 1 and {MAX_PARTITIONS}, found {partitions}"
                    ),
                );
            }
            let capacity = edge.capacity.unwrap_or(DEFAULT_CAPACITY);
            if capacity == 0 {
                cx.err(format!("{path}.capacity"), "capacity must be at least 1");
            }
            if let Some(topic) = &edge.topic {
                if !valid_topic(topic) {
                    cx.err(
                        format!("{path}.topic"),
                        format!("`{topic}` is not a valid Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)"),
                    );
                } else if let Some(other) = topics.insert(topic.clone(), path.clone()) {
                    cx.err(
                        format!("{path}.topic"),
                        format!("topic `{topic}` is already used by {other}; each edge needs its own topic"),
                    );
                }
            }
            graph.add_edge(
                from,
                to,
                EdgeInfo {
                    topic: edge.topic.clone(),
                    partitions: partitions.clamp(1, MAX_PARTITIONS),
                    capacity: capacity.max(1),
                    carries,
                },
            );
        }
    }

    for scc in tarjan_scc(&graph) {
        let is_cycle = scc.len() > 1 || graph.contains_edge(scc[0], scc[0]);
        if is_cycle {
            let mut names: Vec<&str> = scc.iter().map(|i| graph[*i].name.as_str()).collect();
            names.reverse();
            let first = names[0].to_string();
            names.push(&first);
            cx.err(
                format!("stages.{}.inputs", first),
                format!(
                    "cycle: {}; a message must not flow back into a stage it passed",
                    names.join(" -> ")
                ),
            );
        }
    }

    if graph.node_count() == 0 && cx.errors.is_empty() {
        cx.err("stages", "no stages declared");
    }
    let processes = check_processes(&spec, &graph, &mut cx);
    check_provided_once(&graph, &processes, &mut cx);

    if !cx.errors.is_empty() {
        cx.errors.sort_by_key(|d| d.line.unwrap_or(usize::MAX));
        return Err(CompileErrors(cx.errors));
    }
    let order = toposort(&graph, None).map_err(|_| CompileErrors(Vec::new()))?;
    Ok(CompiledPipeline {
        file: file.to_string(),
        graph,
        order,
        processes,
    })
}

/// A role is a process's one handle (one ingest door): two stages that
/// would give it in the same process are refused.
fn check_provided_once(
    graph: &DiGraph<StageNode, EdgeInfo>,
    processes: &[ProcessGroup],
    cx: &mut Ctx<'_>,
) {
    let everything: Vec<String> = graph.node_weights().map(|n| n.name.clone()).collect();
    let groups: Vec<(Option<&str>, &[String])> = if processes.is_empty() {
        vec![(None, everything.as_slice())]
    } else {
        processes
            .iter()
            .map(|p| (Some(p.name.as_str()), p.stages.as_slice()))
            .collect()
    };
    for (group, stages) in groups {
        let mut first: HashMap<RoleId, &str> = HashMap::new();
        for n in graph.node_weights().filter(|n| stages.contains(&n.name)) {
            for &role in &n.provides {
                if let Some(other) = first.insert(role, &n.name) {
                    let place = group
                        .map(|g| format!("process group `{g}`"))
                        .unwrap_or_else(|| "one process".to_string());
                    cx.err(
                        format!("stages.{}.kind", n.name),
                        format!(
                            "stage `{other}` already provides `{role}` in {place}; a process has one, so place these stages in different process groups or keep one"
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{BuildContext, OptionError, StageKind, StageTask};
    use crate::resources::Role;
    use crate::BuildError;

    const DOOR: Role<()> = Role::new("door");
    const TICKS: Role<()> = Role::new("ticks");

    struct Kind {
        name: &'static str,
        input: Option<PortType>,
        output: Option<PortType>,
    }
    struct A;
    struct B;

    impl StageKind for Kind {
        fn kind(&self) -> &'static str {
            self.name
        }
        fn input(&self) -> Option<PortType> {
            self.input
        }
        fn output(&self) -> Option<PortType> {
            self.output
        }
        fn needs(&self) -> Vec<RoleId> {
            match self.name {
                "sink" => vec![TICKS.id()],
                _ => vec![],
            }
        }
        fn provides(&self) -> Vec<RoleId> {
            match self.name {
                "src" => vec![DOOR.id()],
                _ => vec![],
            }
        }
        fn check_options(&self, options: &serde_yaml::Value) -> Vec<OptionError> {
            match options.get("batch") {
                Some(v) if v.as_u64().is_none() => vec![OptionError {
                    field: "batch".into(),
                    message: "must be a positive integer".into(),
                }],
                _ => vec![],
            }
        }
        fn build(&self, _cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
            Ok(vec![])
        }
    }

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.register(Kind {
            name: "src",
            input: None,
            output: Some(PortType::of::<A>("a")),
        });
        r.register(Kind {
            name: "map",
            input: Some(PortType::of::<A>("a")),
            output: Some(PortType::of::<A>("a")),
        });
        r.register(Kind {
            name: "conv",
            input: Some(PortType::of::<A>("a")),
            output: Some(PortType::of::<B>("b")),
        });
        r.register(Kind {
            name: "sink",
            input: Some(PortType::of::<B>("b")),
            output: None,
        });
        r
    }

    fn errors(text: &str) -> Vec<Diagnostic> {
        compile("p.yaml", text, &registry())
            .expect_err("should fail")
            .0
    }

    #[test]
    fn a_good_pipeline_compiles_in_order() {
        let text = "stages:\n  s:\n    kind: src\n  c:\n    kind: conv\n    inputs:\n      - from: s\n        topic: ws2ms_chat\n        partitions: 8\n  k:\n    kind: sink\n    inputs: [c]\n";
        let p = compile("p.yaml", text, &registry()).unwrap();
        let names: Vec<&str> = p.order.iter().map(|i| p.graph[*i].name.as_str()).collect();
        assert_eq!(names, ["s", "c", "k"]);
        assert!(p.to_dot().contains("kafka ws2ms_chat ×8"));
        assert!(p.to_string().contains("3 stages, 2 edges"));
    }

    #[test]
    fn a_diff_names_stages_added_removed_and_changed_by_options_or_edges() {
        let base = "stages:\n  s:\n    kind: src\n  m:\n    kind: map\n    inputs: [s]\n  c:\n    kind: conv\n    inputs: [m]\n  k:\n    kind: sink\n    inputs: [c]\n";
        let old = compile("p.yaml", base, &registry()).unwrap();
        assert!(old.diff(&old, None).is_empty());
        // `k` gets an option; `m` is dropped, so `c` reads `s` (both `s`
        // and `c` have other edges); `k2` is new.
        let text = "stages:\n  s:\n    kind: src\n  c:\n    kind: conv\n    inputs: [s]\n  k:\n    kind: sink\n    inputs: [c]\n    options: {batch: 4}\n  k2:\n    kind: sink\n    inputs: [c]\n";
        let new = compile("p.yaml", text, &registry()).unwrap();
        let d = new.diff(&old, None);
        assert_eq!(d.added, ["k2"]);
        assert_eq!(d.removed, ["m"]);
        assert_eq!(d.changed, ["c", "k", "s"]);
        assert!(d.unchanged.is_empty());
        // A partition count is an edge change too.
        let wider = base.replace(
            "inputs: [c]",
            "inputs:\n      - from: c\n        partitions: 3",
        );
        let d = compile("p.yaml", &wider, &registry())
            .unwrap()
            .diff(&old, None);
        assert_eq!(
            (d.changed, d.unchanged),
            (
                vec!["c".to_string(), "k".to_string()],
                vec!["m".to_string(), "s".to_string()]
            )
        );
    }

    #[test]
    fn a_kafka_edge_may_not_move_topic_or_reader() {
        let on = |from: &str, to: &str, topic: &str| {
            format!("stages:\n  s:\n    kind: src\n  {to}:\n    kind: conv\n    inputs:\n      - from: {from}\n        topic: {topic}\n  k:\n    kind: sink\n    inputs: [{to}]\n")
        };
        let old = compile("p.yaml", &on("s", "m", "t1"), &registry()).unwrap();
        assert!(old.kafka_moves(&old).is_empty());
        // Options of other stages may change freely.
        let moved = compile("p.yaml", &on("s", "m", "t2"), &registry()).unwrap();
        let why = moved.kafka_moves(&old);
        assert!(
            why.iter()
                .any(|w| w.contains("`s` -> `m` would move from topic `t1` to `t2`")),
            "{why:?}"
        );
        let renamed = compile("p.yaml", &on("s", "m2", "t1"), &registry()).unwrap();
        let why = renamed.kafka_moves(&old);
        assert!(
            why.iter()
                .any(|w| w.contains("topic `t1` would be read by `m2` instead of `m`")),
            "{why:?}"
        );
        // Dropping a Kafka-fed stage with its topic is the operator's call.
        let gone = compile(
            "p.yaml",
            "stages:\n  s:\n    kind: src\n  m:\n    kind: conv\n    inputs: [s]\n  k:\n    kind: sink\n    inputs: [m]\n",
            &registry(),
        )
        .unwrap();
        assert_eq!(
            gone.kafka_moves(&old).len(),
            1,
            "the edge itself moved to memory"
        );
    }

    #[test]
    fn reports_every_error_with_its_line() {
        let text = "\
stages:
  s:
    kind: src
  m:
    kind: nope
  c:
    kind: conv
    inputs: [ghost]
  k:
    kind: sink
    inputs: [s]
    options:
      batch: lots
";
        let errs = errors(text);
        let shown: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
        assert_eq!(errs.len(), 4, "{shown:#?}");
        assert!(
            shown[0].starts_with("p.yaml:5: stages.m.kind: unknown stage kind `nope`"),
            "{}",
            shown[0]
        );
        assert!(
            shown[1].starts_with("p.yaml:8: stages.c.inputs[0]: input `ghost` names no stage"),
            "{}",
            shown[1]
        );
        assert!(shown[2].starts_with("p.yaml:11: stages.k.inputs[0]: type mismatch: `s` (kind `src`) produces `a` but `k` (kind `sink`) takes `b`"), "{}", shown[2]);
        assert!(
            shown[3].starts_with("p.yaml:13: stages.k.options.batch: bad option"),
            "{}",
            shown[3]
        );
    }

    #[test]
    fn reports_cycles() {
        let text =
            "stages:\n  a:\n    kind: map\n    inputs: [b]\n  b:\n    kind: map\n    inputs: [a]\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.starts_with("cycle: "), "{}", errs[0]);
        assert!(errs[0].message.contains("a -> b") || errs[0].message.contains("b -> a"));
    }

    #[test]
    fn reports_duplicate_names() {
        let text = "stages:\n  s:\n    kind: src\n  s:\n    kind: src\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].message.contains("used more than once"));
    }

    #[test]
    fn reports_sources_with_inputs_sinks_as_inputs_and_missing_inputs() {
        let text = "stages:\n  s:\n    kind: src\n    inputs: [k]\n  k:\n    kind: sink\n  c:\n    kind: conv\n    inputs: [k]\n";
        let errs = errors(text);
        let msgs: Vec<&str> = errs.iter().map(|d| d.message.as_str()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("is a source and takes no inputs")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("needs an input carrying `b`")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("is a sink and produces nothing")),
            "{msgs:?}"
        );
    }

    #[test]
    fn reports_bad_edges_and_unknown_fields() {
        let text = "stages:\n  s:\n    kind: src\n  m:\n    kind: map\n    inputs:\n      - from: s\n        partitions: 0\n        topic: \"bad topic\"\n  n:\n    kind: map\n    colour: red\n    inputs: [m]\n";
        let errs = errors(text);
        let shown: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
        assert!(
            shown
                .iter()
                .any(|m| m.contains("p.yaml:8: stages.m.inputs[0].partitions")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|m| m.contains("p.yaml:9: stages.m.inputs[0].topic")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|m| m.contains("stages.n") && m.contains("colour")),
            "{shown:#?}"
        );
    }

    #[test]
    fn a_file_that_is_not_yaml_is_one_clear_error() {
        let errs = errors("stages: [\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.starts_with("not a valid pipeline file"));
    }

    const PLACED: &str = "\
stages:
  s:
    kind: src
  c:
    kind: conv
    inputs:
      - from: s
        topic: t1
        partitions: 8
  k:
    kind: sink
    inputs: [c]
processes:
  front:
    stages: [s]
    ports: [10130, 10131]
  back:
    stages: [c, k]
    count: 4
";

    #[test]
    fn process_groups_place_every_stage() {
        let p = compile("p.yaml", PLACED, &registry()).unwrap();
        assert_eq!(p.processes.len(), 2);
        assert_eq!(p.process("front").unwrap().instances(), 2);
        assert_eq!(p.process("front").unwrap().port(1), Some(10131));
        assert_eq!(p.process("back").unwrap().instances(), 4);
        assert_eq!(p.process_of("k").unwrap().name, "back");
        assert!(p.needs(Some("back"), TICKS.id()));
        assert!(!p.needs(Some("front"), TICKS.id()));
        assert!(p.needs(None, TICKS.id()));
        assert!(p.provides(Some("front"), DOOR.id()));
        assert!(!p.provides(Some("back"), DOOR.id()));
        assert!(p.to_dot().contains("subgraph cluster_0"));
        assert!(p
            .to_string()
            .contains("process front ×2: s (ports 10130, 10131)"));
    }

    #[test]
    fn two_stages_giving_one_role_in_one_process_are_rejected() {
        let text = "stages:\n  s1:\n    kind: src\n  s2:\n    kind: src\n  k:\n    kind: sink\n    inputs:\n      - from: s1\n      - from: s2\n";
        let errs = errors(&text.replace("kind: sink", "kind: map"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "stages.s2.kind");
        assert!(
            errs[0].message.contains("`s1` already provides `door`"),
            "{}",
            errs[0]
        );

        // In two process groups, each process has its own door.
        let placed = format!(
            "{}processes:\n  a:\n    stages: [s1]\n    count: 1\n  b:\n    stages: [s2, k]\n    count: 1\n",
            text.replace("kind: sink", "kind: map")
                .replace("- from: s1", "- from: s1\n        topic: t1")
        );
        compile("p.yaml", &placed, &registry()).expect("one door per process");
    }

    #[test]
    fn an_in_memory_edge_between_process_groups_is_rejected() {
        let text = PLACED.replace(
            "    stages: [c, k]\n    count: 4",
            "    stages: [c]\n    count: 4\n  sinks:\n    stages: [k]\n    count: 1",
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0]
                .message
                .contains("c -> k crosses from process `back` to process `sinks`"),
            "{errs:?}"
        );
        assert_eq!(errs[0].path, "stages.k.inputs[0]");
        assert_eq!(errs[0].line, Some(12));
    }

    #[test]
    fn reports_bad_process_groups() {
        let text = PLACED
            .replace("stages: [s]", "stages: [s, nope, c]")
            .replace("count: 4", "count: 4\n    ports: [10130]")
            .replace("back:", "gateway:");
        let msgs: Vec<String> = errors(&text)
            .into_iter()
            .map(|d| format!("{}: {}", d.path, d.message))
            .collect();
        let all = msgs.join("\n");
        assert!(all.contains("`nope` names no stage"), "{all}");
        assert!(
            all.contains("stage `c` is already placed in process `front`"),
            "{all}"
        );
        assert!(all.contains("name of a door process"), "{all}");
        assert!(
            all.contains("either `ports` (one process per port) or `count`"),
            "{all}"
        );
        let unplaced = PLACED.replace("stages: [c, k]", "stages: [c]");
        let errs = errors(&unplaced);
        assert!(
            errs[0]
                .message
                .contains("stage `k` is placed in no process"),
            "{errs:?}"
        );
    }
}
