//! ARCHITECTURE.md's "Write a stage kind", followed to the letter: the kind
//! below is the file a developer writes (in `stages/src/kinds/` it would be
//! the same text), and `register` is the one line that adds it. The
//! pipeline then uses it by name, and a client sees it work over real
//! sockets in both run modes.

mod common;

use common::{Target, TestServer};
use serde_json::json;

/// The file a developer writes: `redact` replaces listed words in text
/// messages before they get their seq, so nobody (history, pushes) ever
/// sees them.
mod redact {
    use imflow_runtime::registry::{decode_options, OptionError, StageResult};
    use imflow_runtime::{
        BuildContext, BuildError, Envelope, Input, Output, PortType, StageKind, StageTask,
    };
    use imflow_stages::kinds::stamped;
    use imflow_stages::model::Stamped;
    use serde::Deserialize;

    /// The options under `options:` in pipeline.yaml; unknown fields are
    /// errors, so a typo is caught by `imflow validate`.
    #[derive(Deserialize, Clone)]
    #[serde(deny_unknown_fields)]
    struct Options {
        /// Words to hide, matched whole and without regard to case.
        words: Vec<String>,
        /// What each hidden word becomes.
        #[serde(default = "stars")]
        with: String,
    }

    fn stars() -> String {
        "***".into()
    }

    pub struct Redact;

    impl StageKind for Redact {
        fn kind(&self) -> &'static str {
            "redact"
        }
        fn input(&self) -> Option<PortType> {
            stamped()
        }
        fn output(&self) -> Option<PortType> {
            stamped()
        }
        fn check_options(&self, options: &serde_yaml::Value) -> Vec<OptionError> {
            decode_options::<Options>(options)
                .err()
                .into_iter()
                .collect()
        }
        // `needs`/`provides` are left empty: this kind takes no store. One
        // that did would list e.g. `roles::DIRECTORY.id()` in `needs` and
        // take it in `build` with `cx.resource(&roles::DIRECTORY)?`.
        fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
            let opts: Options =
                decode_options(cx.options).map_err(|e| BuildError::stage(cx.name, e.message))?;
            let out = cx.output::<Stamped>()?;
            cx.each_input(|input| run(input, out.clone(), opts.clone()))
        }
    }

    /// One partition: its items in order, each passed on with its ack (so
    /// the sender is answered only once the message is stored).
    async fn run(mut input: Input<Stamped>, out: Output<Stamped>, opts: Options) -> StageResult {
        let mut batch: Vec<Envelope<Stamped>> = Vec::with_capacity(256);
        while input.recv_batch(&mut batch, 256).await {
            for mut env in batch.drain(..) {
                if let Some(content) = redacted(&env.item, &opts) {
                    env.item.content = content.into();
                }
                if out.send(env).await.is_err() {
                    return Err("downstream of redact stopped".into());
                }
            }
        }
        Ok(())
    }

    fn redacted(msg: &Stamped, opts: &Options) -> Option<String> {
        const TEXT: i64 = 101;
        if msg.content_type != TEXT {
            return None;
        }
        let mut content: serde_json::Value = serde_json::from_str(&msg.content).ok()?;
        let text = content.get("text")?.as_str()?;
        let hidden: Vec<String> = text
            .split(' ')
            .map(|w| {
                if opts.words.iter().any(|h| h.eq_ignore_ascii_case(w)) {
                    opts.with.clone()
                } else {
                    w.to_string()
                }
            })
            .collect();
        content["text"] = hidden.join(" ").into();
        Some(content.to_string())
    }
}

/// The shipped pipeline (with this server's topics in cluster mode) with a
/// `redact` stage between `ingest` and `seq`, placed with `ingest`.
fn with_redact(pipeline: &std::path::Path, options: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(pipeline).expect("pipeline readable");
    let text = common::stage_after_ingest(
        &text,
        "redact",
        "redact",
        &format!("    inputs: [ingest]\n    options: {options}\n"),
    )
    .replace("stages: [ingest]", "stages: [ingest, redact]");
    let path = pipeline.with_file_name("pipeline-redact.yaml");
    std::fs::write(&path, text).expect("pipeline written");
    path
}

fn registry() -> imflow_runtime::Registry {
    let mut registry = imflow_stages::registry();
    registry.register(redact::Redact);
    registry
}

#[tokio::test]
async fn a_kind_added_the_documented_way_runs_in_the_pipeline() {
    let s = TestServer::start_with_kinds(
        |cfg| {
            let dir = cfg.data_dir.parent().expect("data dir has a parent");
            let shipped = if common::cluster_mode() {
                cfg.pipeline.clone()
            } else {
                let copy = dir.join("pipeline.yaml");
                std::fs::copy(&cfg.pipeline, &copy).expect("copy");
                copy
            };
            cfg.pipeline = with_redact(&shipped, r#"{words: [darn, heck]}"#);
        },
        registry(),
    )
    .await;
    s.register(&["alice", "bob"]).await;
    let mut alice = s.connect("alice", 1).await;
    let mut bob = s.connect("bob", 1).await;

    let ack = alice
        .send_text(Target::User("bob"), "c1", "well DARN it, heck")
        .await;
    let seq = alice.stored(&ack).await;
    let pushed = bob.pushed_chat(1).await;
    assert_eq!(pushed[0]["content"], json!({"text": "well *** it, ***"}));

    // Stored redacted: what a later reader pulls is what was pushed.
    let conversation = pushed[0]["conversation_id"]
        .as_str()
        .expect("id")
        .to_string();
    let pulled = bob
        .request(json!({"op": "pull", "rid": 1, "conversation_id": conversation, "from_seq": seq, "to_seq": seq}))
        .await;
    assert_eq!(
        pulled["messages"][0]["content"],
        json!({"text": "well *** it, ***"}),
        "{pulled}"
    );
}

#[test]
fn a_bad_option_of_the_new_kind_is_named_by_validation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = dir.path().join("pipeline.yaml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/pipeline.yaml"),
        &shipped,
    )
    .expect("copy");
    let path = with_redact(&shipped, "{words: darn}");
    let err = imflow::load_pipeline(&path, true, &registry())
        .expect_err("a string is not a list of words")
        .to_string();
    assert!(err.contains("stages.redact.options.words"), "{err}");
    assert!(err.contains("bad option for kind `redact`"), "{err}");

    // Without its registration line the pipeline names the kind unknown.
    let err = imflow::load_pipeline(&path, true, &imflow_stages::registry())
        .expect_err("not registered")
        .to_string();
    assert!(err.contains("unknown stage kind `redact`"), "{err}");
}
