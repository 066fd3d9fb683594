//! The library API alone, end to end: train a tiny two-task run on the tiny random test model, reopen it,
//! ask what it can do, score it and predict with it. No command-line tool is involved.
//!
//! ```sh
//! cargo run --release -p mtl --example library
//! ```

use std::path::Path;

use mtl::{Config, Input, Operation, PredictOptions, Run, TrainOptions};

fn main() -> mtl::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let source = root.join("tests/python/tiny-run.toml");
    let dir = tempfile::tempdir().map_err(|e| mtl::Error::Usage(format!("cannot make a temporary directory: {e}")))?;
    let out = dir.path().join("run");

    // The config's paths are relative to the repository root.
    let mut config = Config::load(&source, &["training.epochs=2".into()])?;
    config.model.path = root.join(&config.model.path);
    for task in config.tasks.values_mut() {
        task.data.train = root.join(&task.data.train);
        task.data.dev = task.data.dev.as_ref().map(|d| root.join(d));
    }
    let training = mtl::train(&config, &source, &out, &TrainOptions::default())?;
    let report = training.run.expect("a run was trained");
    println!("trained {} steps in {:.1} s, best epoch {}", report.steps, report.seconds, report.best_epoch);

    let run = Run::open(&out)?;
    let capabilities = run.capabilities();
    println!(
        "{} run, {:?} weights; can export: {}",
        capabilities.architecture.name(),
        capabilities.weights,
        capabilities.can(Operation::Export)
    );
    let scores = run.evaluate(&config, &source)?;
    println!("dev scores: {}", serde_json::to_string(&scores["dev"]).expect("scores serialize"));

    let inputs = [Input::Text("show me flights from boston to denver".into())];
    for record in run.predict(&inputs, &PredictOptions::default())? {
        println!("{}", serde_json::to_string(&record).expect("predictions serialize"));
    }
    Ok(())
}
