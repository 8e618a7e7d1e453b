//! `imflow test FILE...`: pipeline tests written in YAML. Each test names a
//! stage or a chain of stages of a pipeline file, gives the items that
//! enter the first, and states what must come out of the last (in order,
//! each field given must match) and what became of each input's ack.
//!
//! The stages run as they do in a server, with their own options, on a
//! fresh embedded store (SQLite in a temporary directory): `persist-mongo`
//! writes the embedded history, `persist-redis` the in-memory hot cache.
//! The harness feeds the first stage through a source of its input type
//! (`ingest`, which has none, takes sends as a door gives them) and
//! collects from the last through a sink of its output type; `push`,
//! which has none, is read from the users it delivered to. Every edge has
//! one partition, so what comes out has one order.
//!
//! ```yaml
//! pipeline: ../../pipeline.yaml      # relative to this file
//! tests:
//!   - name: seq numbers a conversation from 1
//!     stages: [seq]                  # or a chain: [seq, history, hot]
//!     given: {users: [alice, bob], groups: {g1: [alice, bob]}, online: [bob]}
//!     input:
//!       - {conversation_id: si_alice_bob, ...}
//!     expect:
//!       output:
//!         - {seq: 1, msg: {client_msg_id: c1}}
//!       acks: [delivered]
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use imflow_runtime::harness::{status_name, Fed, TEST_COLLECT, TEST_FEED};
use imflow_runtime::{compile, CompiledPipeline, Registry, RunningTopology};
use imflow_stages::roles::{DEAD_LETTERS, INGEST_DOOR};
use imflow_stages::store::{Durability, SqliteStore};
use imflow_stages::{Backends, Presence, PushItem, Services};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Test files (YAML); every test of each is run.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Run only the tests whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    /// The pipeline whose stages are tested, relative to the test file
    /// (default: pipeline.yaml in the current directory).
    pipeline: Option<PathBuf>,
    tests: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    /// One stage, or a chain in flow order (each reads the one before).
    stages: Vec<String>,
    #[serde(default)]
    given: Given,
    /// Items of the first stage's input type; for `ingest`, sends:
    /// `{sender, client_msg_id, recv_id | group_id, content_type, content}`.
    input: Vec<Value>,
    #[serde(default)]
    expect: Expect,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Given {
    users: Vec<String>,
    /// Group → members, the first its owner.
    groups: BTreeMap<String, Vec<String>>,
    /// Users with a connection (what `push` delivers to).
    online: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Expect {
    /// What leaves the last stage, in order; each field given must match
    /// (a string holding JSON is matched as that JSON).
    output: Option<Vec<Value>>,
    /// Per input, its ack: delivered, duplicate, refused or failed (for
    /// sends into `ingest`, the error code a client would get).
    acks: Option<Vec<String>>,
}

/// Users online, and what `push` gave each.
#[derive(Default)]
struct Recorder {
    online: HashSet<String>,
    delivered: Mutex<Vec<Value>>,
}

impl Presence for Recorder {
    fn deliver(&self, user: &str, item: &PushItem) {
        if !self.online.contains(user) {
            return;
        }
        if let Ok(mut d) = self.delivered.lock() {
            d.push(
                json!({"user": user, "conversation_id": &*item.conversation_id,
                "seq": item.seq, "body": &*item.body}),
            );
        }
    }
    fn is_online(&self, user: &str) -> bool {
        self.online.contains(user)
    }
}

/// How long an input's ack may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

pub async fn run(args: TestArgs) -> anyhow::Result<()> {
    let (mut passed, mut failed) = (0, 0);
    let mut ran_any = false;
    for file in &args.files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read test file {}", file.display()))?;
        let tf: TestFile = serde_yaml::from_str(&text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(":{}", l.line()))
                .unwrap_or_default();
            anyhow::anyhow!("{}{at}: {e}", file.display())
        })?;
        let pipeline_path = match &tf.pipeline {
            Some(p) => file.parent().unwrap_or(Path::new(".")).join(p),
            None => PathBuf::from("pipeline.yaml"),
        };
        let pipeline = crate::load_pipeline(&pipeline_path, true, &imflow_stages::registry())?;
        for case in &tf.tests {
            if args.only.as_ref().is_some_and(|o| !case.name.contains(o)) {
                continue;
            }
            ran_any = true;
            match run_case(&pipeline, case).await {
                Ok(()) => {
                    passed += 1;
                    println!("ok    {}: {}", file.display(), case.name);
                }
                Err(why) => {
                    failed += 1;
                    println!("FAIL  {}: {}\n{}", file.display(), case.name, indent(&why));
                }
            }
        }
    }
    if !ran_any {
        // A filter that matches nothing would otherwise look like success.
        bail!(
            "no test matches --only {:?} in {} file(s)",
            args.only.as_deref().unwrap_or_default(),
            args.files.len()
        );
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} pipeline test(s) failed");
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("      {l}\n")).collect()
}

/// The harness pipeline: the chain, fed by a test source and read by a
/// test sink where the ends have ports.
fn harness(
    pipeline: &CompiledPipeline,
    case: &Case,
    registry: &Registry,
) -> Result<String, String> {
    if case.stages.is_empty() {
        return Err("`stages` names no stage".into());
    }
    let mut stages = serde_yaml::Mapping::new();
    let mut previous: Option<String> = None;
    for (i, name) in case.stages.iter().enumerate() {
        let node = pipeline
            .graph
            .node_weights()
            .find(|n| &n.name == name)
            .ok_or_else(|| format!("no stage `{name}` in {}", pipeline.file))?;
        if i == 0 {
            if let Some(port) = node.input {
                let source = format!("test-source:{}", port.name);
                if registry.get(&source).is_none() {
                    return Err(format!("no test source for `{}` items", port.name));
                }
                stages.insert("test_input".into(), yaml(json!({"kind": source})));
                previous = Some("test_input".into());
            }
        }
        let mut stage = json!({"kind": node.kind});
        if let Some(p) = &previous {
            stage["inputs"] = json!([p]);
        }
        let mut stage = yaml(stage);
        if !node.options.is_null() {
            if let serde_yaml::Value::Mapping(m) = &mut stage {
                m.insert("options".into(), node.options.clone());
            }
        }
        stages.insert(name.as_str().into(), stage);
        previous = Some(name.clone());
        if i + 1 == case.stages.len() {
            if let Some(port) = node.output {
                stages.insert(
                    "test_output".into(),
                    yaml(json!({"kind": format!("test-sink:{}", port.name), "inputs": [name]})),
                );
            }
        }
    }
    let mut doc = serde_yaml::Mapping::new();
    doc.insert("version".into(), 1.into());
    doc.insert("stages".into(), serde_yaml::Value::Mapping(stages));
    serde_yaml::to_string(&doc).map_err(|e| e.to_string())
}

fn yaml(v: Value) -> serde_yaml::Value {
    serde_yaml::to_value(v).unwrap_or_default()
}

async fn run_case(pipeline: &CompiledPipeline, case: &Case) -> Result<(), String> {
    let mut registry = imflow_stages::registry();
    imflow_stages::register_test_kinds(&mut registry);
    if case.expect.output.is_none() && case.expect.acks.is_none() {
        return Err(
            "`expect` gives neither `output` nor `acks`, so nothing would be checked".into(),
        );
    }
    let text = harness(pipeline, case, &registry)?;
    // The harness text is generated: its line numbers would mean nothing
    // to the reader, so only what is wrong is told.
    let compiled = compile(&format!("(test `{}`)", case.name), &text, &registry).map_err(|e| {
        let why: Vec<String> =
            e.0.iter()
                .map(|d| format!("{}: {}", d.path, d.message))
                .collect();
        format!(
            "the chain {:?} cannot run on its own: {}",
            case.stages,
            why.join("; ")
        )
    })?;
    let sinks = compiled
        .graph
        .node_weights()
        .any(|n| n.kind.starts_with("test-sink:"));
    let pushes = compiled.graph.node_weights().any(|n| n.kind == "push");
    if case.expect.output.is_some() && !sinks && !pushes {
        return Err(format!(
            "`{}` gives no output to compare (no output port, and no `push` in the chain); check `expect.acks` instead",
            case.stages.last().map(String::as_str).unwrap_or_default()
        ));
    }

    let dir = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
    let store = SqliteStore::open(dir.path(), Durability::Normal)
        .await
        .map_err(|e| format!("the embedded store: {e}"))?;
    let recorder = Arc::new(Recorder {
        online: case.given.online.iter().cloned().collect(),
        ..Default::default()
    });
    let services = Services::open(Backends::embedded(store.clone(), 10_000), recorder.clone())
        .await
        .map_err(|e| format!("the services: {e}"))?;
    given(&services, &case.given).await?;
    let (collect, mut collected) = mpsc::unbounded_channel();
    let mut resources = services.resources().with(&TEST_COLLECT, collect);
    if compiled.needs(None, DEAD_LETTERS.id()) {
        resources.insert(
            &DEAD_LETTERS,
            store.clone() as Arc<dyn imflow_stages::store::DeadLetters>,
        );
    }
    let topology =
        RunningTopology::start(&compiled, &registry, &resources).map_err(|e| e.to_string())?;

    let acks = feed(&topology, &case.input).await;
    let drained = topology.shutdown(PATIENCE).await;
    let acks = acks?;
    if !drained {
        return Err("the stages did not stop within 10 s of their input closing".into());
    }
    let mut output = Vec::new();
    while let Ok(v) = collected.try_recv() {
        output.push(v);
    }
    if !sinks {
        output = recorder
            .delivered
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
    }
    let mut problems = Vec::new();
    if let Some(want) = &case.expect.acks {
        if want != &acks {
            problems.push(format!("acks: expected {want:?}, got {acks:?}"));
        }
    }
    if let Some(want) = &case.expect.output {
        problems.extend(compare(want, &output));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// Users and groups the test starts with.
async fn given(services: &Services, g: &Given) -> Result<(), String> {
    let mut users: Vec<(String, Option<String>)> =
        g.users.iter().map(|u| (u.clone(), None)).collect();
    for members in g.groups.values() {
        users.extend(members.iter().map(|u| (u.clone(), None)));
    }
    let dir = &services.directory;
    dir.register_users(&users)
        .await
        .map_err(|e| format!("given.users: {e}"))?;
    for (group, members) in &g.groups {
        let owner = members
            .first()
            .ok_or_else(|| format!("given.groups.{group}: no members"))?;
        dir.create_group(group, group, owner, members)
            .await
            .map_err(|e| format!("given.groups.{group}: {e}"))?;
        // Members from the first message on, as if the group's creation
        // notice had been stored before the test.
        dir.set_min_seq(group, members, 1)
            .await
            .map_err(|e| format!("given.groups.{group}: {e}"))?;
    }
    Ok(())
}

/// Feed every input, in order, and wait for each one's ack.
async fn feed(topology: &RunningTopology, input: &[Value]) -> Result<Vec<String>, String> {
    let mut waiting: Vec<futures::future::BoxFuture<'static, Result<String, String>>> = Vec::new();
    // A resend is answered with its first ack (as a client sees it); the
    // test names it `duplicate` by that message id.
    let first_ids = Arc::new(Mutex::new(HashSet::<String>::new()));
    if let Some(door) = topology.provided(&INGEST_DOOR) {
        for (i, v) in input.iter().enumerate() {
            let sender: Arc<str> = v["sender"]
                .as_str()
                .ok_or_else(|| format!("input[{i}]: a send names its `sender`"))?
                .into();
            let mut req = v.clone();
            if let Some(m) = req.as_object_mut() {
                m.remove("sender");
            }
            let req = serde_json::from_value(req).map_err(|e| format!("input[{i}]: {e}"))?;
            let ids = first_ids.clone();
            let outcome = match door.send(&sender, req).await {
                Ok(pending) => Box::pin(async move {
                    Ok(match pending.wait().await {
                        Ok(info) => {
                            let first = ids
                                .lock()
                                .map(|mut s| s.insert(info.server_msg_id))
                                .unwrap_or(true);
                            if first { "delivered" } else { "duplicate" }.to_string()
                        }
                        Err(e) => e.code.as_str().to_string(),
                    })
                }) as futures::future::BoxFuture<'static, _>,
                Err(e) => Box::pin(async move { Ok(e.code.as_str().to_string()) }),
            };
            waiting.push(outcome);
        }
    } else {
        let feed = topology
            .provided(&TEST_FEED)
            .ok_or("the chain's first stage takes neither items nor sends")?;
        for (i, v) in input.iter().enumerate() {
            let (done, outcome) = oneshot::channel();
            feed.send(Fed {
                item: v.clone(),
                done,
            })
            .map_err(|_| "the test source stopped".to_string())?;
            waiting.push(Box::pin(async move {
                match outcome.await {
                    Ok(Ok(status)) => Ok(status_name(&status).to_string()),
                    Ok(Err(e)) => Err(format!("input[{i}] is not an item of this type: {e}")),
                    Err(_) => Err(format!("input[{i}]: its ack was lost")),
                }
            }));
        }
    }
    let mut acks = Vec::new();
    for (i, w) in waiting.into_iter().enumerate() {
        let a = tokio::time::timeout(PATIENCE, w)
            .await
            .map_err(|_| format!("input[{i}]: no ack within 10 s (a stage holds it)"))??;
        acks.push(a);
    }
    Ok(acks)
}

/// Each expected item against the one at its place; a diff per mismatch.
fn compare(want: &[Value], got: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    if want.len() != got.len() {
        problems.push(format!(
            "output: expected {} item(s), got {}",
            want.len(),
            got.len()
        ));
    }
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let seen = project(w, g);
        if &seen != w {
            let (a, b) = (pretty(w), pretty(&seen));
            let diff = similar::TextDiff::from_lines(&a, &b)
                .unified_diff()
                .header("expected", "got")
                .to_string();
            problems.push(format!("output[{i}]:\n{diff}"));
        }
    }
    for (i, g) in got.iter().enumerate().skip(want.len()) {
        problems.push(format!("output[{i}], not expected: {}", pretty(g)));
    }
    problems
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// `got` cut down to the fields `want` names (a string holding JSON read
/// as that JSON when `want` is an object or array there), so equal means
/// "every field given matches" and a diff shows only those fields.
fn project(want: &Value, got: &Value) -> Value {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => Value::Object(
            w.iter()
                .filter_map(|(k, wv)| g.get(k).map(|gv| (k.clone(), project(wv, gv))))
                .collect(),
        ),
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            Value::Array(w.iter().zip(g).map(|(wv, gv)| project(wv, gv)).collect())
        }
        (Value::Object(_) | Value::Array(_), Value::String(s)) => {
            match serde_json::from_str::<Value>(s) {
                Ok(parsed) if parsed.is_object() || parsed.is_array() => project(want, &parsed),
                _ => got.clone(),
            }
        }
        _ => got.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_projection_keeps_the_fields_asked_for_and_reads_json_in_strings() {
        let got =
            json!({"seq": 2, "body": "{\"seq\":2,\"content\":{\"text\":\"hi\"}}", "extra": 1});
        let want = json!({"seq": 2, "body": {"content": {"text": "hi"}}});
        assert_eq!(project(&want, &got), want);
        let wrong = json!({"seq": 3});
        assert_eq!(project(&wrong, &got), json!({"seq": 2}));
        // A field asked for and missing shows as missing.
        assert_eq!(project(&json!({"nope": 1}), &got), json!({}));
        let problems = compare(&[wrong], &[got]);
        assert!(
            problems[0].contains("-  \"seq\": 3") && problems[0].contains("+  \"seq\": 2"),
            "{problems:?}"
        );
    }
}
