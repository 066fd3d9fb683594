//! A trained run opened for use: [`Run::open`] reads its manifest, checks its base model, and loads the
//! backbone it names; [`Run::capabilities`] says what the run can do; [`Run::evaluate`] and [`Run::predict`]
//! work on any backbone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_config::{Config, Split};
use mtl_core::TaskId;
use mtl_data::{Input, LabelMap, Location};
use mtl_train::{Scores, Trainer};
use serde::Serialize;

use crate::decoder::DecoderRun;
use crate::encoder::EncoderRun;
use crate::error::{bail, Error, Result};
use crate::manifest::{RunManifest, WeightLayout};
use crate::predict::{PredictOptions, PredictionRecord};
use crate::Architecture;

/// What can be asked of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Evaluate,
    Predict,
    /// Every task over HTTP (`POST /v1/predict`; a decoder run's answered by generation).
    ServeTasks,
    /// Free text generation (`mtl generate`, `POST /v1/generate`).
    Generate,
    /// Each task as a Hugging Face transformers model.
    Export,
    Quantize,
    Prune,
    AddTask,
    /// Some tasks trained further on new data, the others protected (`mtl update`).
    Update,
    /// Attributions of every task's answer to the input's words (`mtl explain`, `POST /v1/explain`).
    Explain,
}

impl Operation {
    pub const ALL: [Operation; 10] = [
        Operation::Evaluate,
        Operation::Predict,
        Operation::ServeTasks,
        Operation::Generate,
        Operation::Export,
        Operation::Quantize,
        Operation::Prune,
        Operation::AddTask,
        Operation::Update,
        Operation::Explain,
    ];
}

/// What a run can do: every [`Operation`], with the reason where it cannot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Capabilities {
    pub architecture: Architecture,
    pub weights: WeightLayout,
    /// `None` where the run can do the operation; why not otherwise.
    pub operations: BTreeMap<Operation, Option<String>>,
}

impl Capabilities {
    pub fn can(&self, op: Operation) -> bool {
        self.operations.get(&op).is_some_and(Option::is_none)
    }
}

/// The loaded model of a run, by backbone.
pub(crate) enum Loaded {
    Encoder(Box<EncoderRun>),
    Decoder(Box<DecoderRun>),
}

/// A trained run, opened.
pub struct Run {
    dir: PathBuf,
    manifest: RunManifest,
    pub(crate) loaded: Loaded,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").field("dir", &self.dir).field("manifest", &self.manifest).finish_non_exhaustive()
    }
}

impl Run {
    /// Opens the run in `dir` for inference: one shared LoRA adapter of an encoder is merged into its weights.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, true)
    }

    /// Opens the run in `dir` with its adapters as trained (unmerged), to train on (`add_task`).
    pub fn open_unmerged(dir: &Path) -> Result<Self> {
        Self::open_with(dir, false)
    }

    /// Opens the run in `dir` to explain its predictions ([`Run::explain`]): dropout off (LoRA's too) and
    /// the projections in f32, for gradients without randomness.
    pub fn open_for_explanations(dir: &Path) -> Result<Self> {
        let run = Self::open_with_gradients(dir, true, true)?;
        run.require(Operation::Explain)?;
        Ok(run)
    }

    fn open_with(dir: &Path, merge: bool) -> Result<Self> {
        Self::open_with_gradients(dir, merge, false)
    }

    fn open_with_gradients(dir: &Path, merge: bool, gradients: bool) -> Result<Self> {
        let manifest = RunManifest::read(dir)?;
        let loaded = match manifest.architecture {
            Architecture::Bert => Loaded::Encoder(Box::new(EncoderRun::load(dir, &manifest, merge, gradients)?)),
            Architecture::Llama => Loaded::Decoder(Box::new(DecoderRun::load(dir, &manifest)?)),
        };
        Ok(Self { dir: dir.to_owned(), manifest, loaded })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &RunManifest {
        &self.manifest
    }

    /// The run's resolved config (its `model.path` is the run directory).
    pub fn config(&self) -> &Config {
        match &self.loaded {
            Loaded::Encoder(e) => &e.config,
            Loaded::Decoder(d) => &d.config,
        }
    }

    pub fn labels(&self) -> &BTreeMap<TaskId, LabelMap> {
        match &self.loaded {
            Loaded::Encoder(e) => &e.labels,
            Loaded::Decoder(d) => &d.labels,
        }
    }

    /// The encoder run, for the operations only encoders have (checked by [`Run::require`] first).
    pub(crate) fn into_encoder(self) -> Result<EncoderRun> {
        match self.loaded {
            Loaded::Encoder(e) => Ok(*e),
            Loaded::Decoder(_) => {
                Err(Error::Unsupported { run: self.dir, message: "an encoder run is needed here".into() })
            }
        }
    }

    /// What this run can do, and why not where it cannot.
    pub fn capabilities(&self) -> Capabilities {
        let mut operations = BTreeMap::new();
        for op in Operation::ALL {
            operations.insert(op, self.refusal(op));
        }
        Capabilities { architecture: self.manifest.architecture, weights: self.manifest.weights, operations }
    }

    /// An error where the run cannot do `op`.
    pub fn require(&self, op: Operation) -> Result<()> {
        match self.refusal(op) {
            None => Ok(()),
            Some(message) => Err(Error::Unsupported { run: self.dir.clone(), message }),
        }
    }

    fn refusal(&self, op: Operation) -> Option<String> {
        let peft = &self.config().peft;
        match &self.loaded {
            Loaded::Encoder(e) => {
                let int8 = e.model.bert().int8_layers().is_some();
                let merged = !peft.enabled() || e.model.bert().merged().is_some();
                match op {
                    Operation::Evaluate | Operation::Predict | Operation::ServeTasks => None,
                    Operation::Generate => Some("an encoder run has no language-model head; generation takes a decoder model".into()),
                    Operation::Export if int8 => Some(
                        "an int8 model (mtl quantize) has no f32 weights to export; export the model it was quantised from".into(),
                    ),
                    Operation::Export if peft.enabled() && e.model.bert().peft().is_some_and(|p| p.lora().is_none()) => Some(
                        "bottleneck adapters and prefix tuning change the network, so they cannot be written as a plain transformers model (LoRA merges into the weights and can)".into(),
                    ),
                    Operation::Quantize if int8 => Some("the model is int8 already".into()),
                    Operation::Quantize if e.model.bert().config().disentangled.is_some() => Some(
                        "the int8 encoder has no disentangled attention, which a DeBERTa model needs".into(),
                    ),
                    Operation::Quantize if !merged => Some(
                        "int8 quantisation needs one set of encoder weights; this model has per-task adapters or adapters that do not merge (only a shared LoRA adapter merges)".into(),
                    ),
                    Operation::Prune if !merged => Some(
                        "pruning a model with per-task or non-LoRA adapters is not supported; prune the base model before training the adapters".into(),
                    ),
                    Operation::AddTask if int8 => Some(
                        "an int8 model (mtl quantize) is for inference; add tasks to the model it was quantised from".into(),
                    ),
                    Operation::Update if int8 => Some(
                        "an int8 model (mtl quantize) is for inference; update the model it was quantised from".into(),
                    ),
                    Operation::Explain if int8 => Some(
                        "an int8 model (mtl quantize) has no gradients to explain with; explain the model it was quantised from".into(),
                    ),
                    Operation::Export
                    | Operation::Quantize
                    | Operation::Prune
                    | Operation::AddTask
                    | Operation::Update
                    | Operation::Explain => None,
                }
            }
            Loaded::Decoder(_) => match op {
                // Its tasks are served through the generation engine, beside free generation.
                Operation::Evaluate | Operation::Predict | Operation::ServeTasks => None,
                Operation::Generate if peft.enabled() && peft.per_task => Some(
                    "`mtl generate` takes a run with one shared adapter; a run with one adapter per task generates through `mtl serve`, each request naming its task's adapter (`adapter`, or OpenAI's `model`)".into(),
                ),
                Operation::Generate => None,
                Operation::Export
                | Operation::Quantize
                | Operation::Prune
                | Operation::AddTask
                | Operation::Update
                | Operation::Explain => {
                    Some("a decoder run; this takes encoder runs so far (a decoder run can evaluate, predict and generate)".into())
                }
            },
        }
    }

    /// `config` checked against the run: each of its tasks must be one the run was trained for, of the same
    /// kind. Returns it with the run's model settings (and, for a decoder, the trained prompts and label words).
    fn scoring_config(&self, config: &Config, source: &Path) -> Result<Config> {
        let trained = self.config();
        let mut config = config.clone();
        for (task, t) in &config.tasks {
            match trained.tasks.get(task) {
                Some(have) if have.kind == t.kind => {}
                Some(have) => bail!(
                    "{}: task `{task}` is {} here but the model was trained for {}",
                    source.display(),
                    t.kind.name(),
                    have.kind.name()
                ),
                None => bail!(
                    "{}: task `{task}` has no head in {}; its tasks are: {}",
                    source.display(),
                    self.dir.display(),
                    trained.tasks.keys().map(TaskId::as_str).collect::<Vec<_>>().join(", ")
                ),
            }
        }
        config.model = trained.model.clone();
        if let Loaded::Decoder(_) = &self.loaded {
            // The adapters answer the prompts they were trained on, in the words they learnt.
            for (task, t) in config.tasks.iter_mut() {
                let have = &trained.tasks[task];
                if t.prompt != have.prompt || t.verbalizer != have.verbalizer {
                    tracing::warn!(
                        "task `{task}`: {} gives another prompt or other label words than training did; the trained ones are used",
                        source.display()
                    );
                }
                t.prompt.clone_from(&have.prompt);
                t.verbalizer.clone_from(&have.verbalizer);
            }
            crate::decoder::check_config(&config, source)?;
        }
        Ok(config)
    }

    /// Scores the run on the dev and test files of `config` (`source`: where it came from, for messages);
    /// `{"dev": …, "test": …}` by split name.
    pub fn evaluate(&self, config: &Config, source: &Path) -> Result<BTreeMap<&'static str, Scores>> {
        self.require(Operation::Evaluate)?;
        let config = self.scoring_config(config, source)?;
        let mut scores = BTreeMap::new();
        for split in [Split::Dev, Split::Test] {
            let got = match &self.loaded {
                Loaded::Encoder(e) => match crate::encoder::load_split(&config, split, &e.encoder, &e.labels)? {
                    Some(data) => Some(Trainer::evaluator(&config, &e.model, &e.labels).evaluate(&data)?.scores),
                    None => None,
                },
                Loaded::Decoder(d) => d.evaluate(&config, split)?,
            };
            if let Some(s) = got {
                scores.insert(split.name(), s);
            }
        }
        if scores.is_empty() {
            bail!("{}: no task has a dev or test file to score", source.display());
        }
        Ok(scores)
    }

    /// Writes the run's drift reference (`drift-reference.json`: the distributions of its answers to the dev
    /// files of `config`), for a run trained before drift monitoring or to compare with other data; returns
    /// its path. Encoder runs only.
    pub fn write_drift_reference(&self, config: &Config, source: &Path) -> Result<PathBuf> {
        let Loaded::Encoder(e) = &self.loaded else {
            return Err(Error::Unsupported {
                run: self.dir.clone(),
                message: "drift references are kept for encoder runs so far".into(),
            });
        };
        let config = self.scoring_config(config, source)?;
        let Some(dev) = crate::encoder::load_split(&config, Split::Dev, &e.encoder, &e.labels)? else {
            bail!("{}: no task has a dev file to take the reference from", source.display());
        };
        let reference = crate::encoder::dev_reference(&e.model, &config, &e.labels, &dev)?;
        let path = self.dir.join(mtl_serve::drift::REFERENCE_FILE);
        let text = serde_json::to_string_pretty(&reference).expect("references serialize; this is a bug");
        crate::files::write_durably(&path, &text)?;
        Ok(path)
    }

    /// One line of `mtl predict` input: a JSON object (`{"text": …}`, `{"text": …, PAIR_FIELD: …}`,
    /// `{"words": […]}`, `{"question": …, "context": …}`) or plain text.
    pub fn parse_input(&self, line: &str, location: &Location) -> Result<Input> {
        crate::predict::parse_input(line, location, self.config())
    }

    /// Every task's prediction for each input, in order; an input that cannot be encoded is an error naming
    /// its location.
    pub fn predict_located(
        &self,
        inputs: &[(Location, Input)],
        options: &PredictOptions,
    ) -> Result<Vec<PredictionRecord>> {
        self.require(Operation::Predict)?;
        match &self.loaded {
            Loaded::Encoder(e) => crate::encoder::predict::records(e, inputs, options),
            Loaded::Decoder(d) => d.predict(inputs, options.batch_size),
        }
    }

    /// Why each task answered each input as it did ([`crate::explain`]); the run must have been opened with
    /// [`Run::open_for_explanations`].
    pub fn explain(
        &self,
        inputs: &[(Location, Input)],
        options: &crate::ExplainOptions,
    ) -> Result<Vec<crate::Explanation>> {
        self.require(Operation::Explain)?;
        match &self.loaded {
            Loaded::Encoder(e) if e.gradients => crate::explain::explain(e, inputs, options),
            _ => Err(Error::Unsupported {
                run: self.dir.clone(),
                message: "explanations need the run opened for them (Run::open_for_explanations)".into(),
            }),
        }
    }

    /// [`Run::predict_located`] of inputs numbered from 1.
    pub fn predict(&self, inputs: &[Input], options: &PredictOptions) -> Result<Vec<PredictionRecord>> {
        let located: Vec<(Location, Input)> = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| (Location { path: "input".into(), line: i + 1 }, input.clone()))
            .collect();
        self.predict_located(&located, options)
    }
}
