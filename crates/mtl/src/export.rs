//! Export: every task of a trained encoder run as its own Hugging Face `transformers` model directory, which
//! `AutoModelFor…`, `pipeline(…)` and `AutoTokenizer` load as they are, in the family of the model it was
//! trained from (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT, MPNet, DeBERTa-v2/v3, ModernBERT):
//!
//! - classification → `…ForSequenceClassification` (`problem_type` single- or multi-label);
//! - regression → `…ForSequenceClassification` with `problem_type = "regression"`, the target scaling folded
//!   into the classifier, so it outputs values in the data's units;
//! - token classification → `…ForTokenClassification`;
//! - span-extraction QA → `…ForQuestionAnswering`.
//!
//! The backbone is the trained one, with LoRA merged into its weights (the shared adapter, or the task's own),
//! under the family's names. mtl's heads read the first token's state directly, while each family's
//! `…ForSequenceClassification` puts a square layer and an activation in between:
//! - BERT's pooler and RoBERTa's (and XLM-R's, CamemBERT's, MPNet's) `classifier.dense`, `tanh(W x + b)`: the
//!   export sets `W = εI`, `b = 0` and divides the classifier's weights by ε (ε = 1e-4), so that
//!   `classifier(tanh(ε x)) = classifier(x)` up to `ε² x³ / 3`, far below float32 rounding of the logits;
//! - ELECTRA's `classifier.dense` with GELU, DistilBERT's `pre_classifier` with ReLU and DeBERTa's
//!   `pooler.dense` with its `pooler_hidden_act` (GELU unless tanh, which takes the ε form): the export sets
//!   `W = I` and `b = c`, with `c` above the largest value the encoder's last LayerNorm can give plus 8 in
//!   every dimension (`|γ| √(H − 1) + |β| + 8`), where GELU and ReLU are the identity in float32; the
//!   classifier's bias takes `− W c` back;
//! - ModernBERT's prediction head (`head.dense`, its activation, `head.norm`, before the classifier of every task
//!   model) is part of mtl's heads on that family, trained with them, and exported as it is.
//!
//! A token task with a CRF is skipped (transformers has no CRF head), with a warning.
//!
//! A LoRA or AdaLoRA run also gets `OUT/TASK/peft/`, the task in PEFT's adapter format: its adapter (AdaLoRA's
//! with the triplets it kept and their `rank_pattern`) and its head (`modules_to_save`), to load with
//! `PeftModel.from_pretrained` onto the original base model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use mtl_core::{TaskId, TaskKind};
use serde_json::{json, Value};

use crate::encoder::EncoderRun as Loaded;
use crate::error::{bail, read_json, read_text, write_text, Error, Result};
use crate::files as checkpoint;
use crate::run::{Operation, Run};

/// The pooler's scale ε: `tanh(ε x) / ε ≈ x`.
const POOLER_EPS: f64 = 1e-4;

/// How a family's `transformers` task models are named and built.
struct Family {
    /// The attribute that holds the backbone (`bert`, `roberta`, …).
    prefix: &'static str,
    /// The stem of the task models' class names (`Bert`, `XLMRoberta`, …).
    class: &'static str,
    head: SequenceHead,
}

/// The layer between the first token's state and the classifier in `…ForSequenceClassification`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SequenceHead {
    /// BERT: the backbone's pooler, `tanh(pooler.dense(x))`, then `classifier`.
    Pooler,
    /// `classifier.dense`, tanh, `classifier.out_proj` (RoBERTa, XLM-R, CamemBERT, MPNet).
    Tanh,
    /// `classifier.dense`, GELU, `classifier.out_proj` (ELECTRA).
    Gelu,
    /// `pre_classifier`, ReLU, `classifier` (DistilBERT).
    Relu,
    /// DeBERTa's `pooler.dense` with `pooler_hidden_act` (GELU by default), then `classifier`.
    Context { tanh: bool },
    /// ModernBERT's prediction head (`head`, in mtl's heads too), then `classifier`.
    Prediction,
}

impl Family {
    /// The family of a `model_type`, with its config (DeBERTa's pooler activation).
    fn of(model_type: &str, config: &Value) -> Option<Self> {
        let (class, head) = match model_type {
            "deberta-v2" => match config["pooler_hidden_act"].as_str().unwrap_or("gelu") {
                "tanh" => ("DebertaV2", SequenceHead::Context { tanh: true }),
                // Activations that are the identity far enough above 0.
                "gelu" | "gelu_new" | "gelu_python" | "gelu_pytorch_tanh" | "relu" => {
                    ("DebertaV2", SequenceHead::Context { tanh: false })
                }
                _ => return None,
            },
            "bert" => ("Bert", SequenceHead::Pooler),
            "roberta" => ("Roberta", SequenceHead::Tanh),
            "xlm-roberta" => ("XLMRoberta", SequenceHead::Tanh),
            "camembert" => ("Camembert", SequenceHead::Tanh),
            "mpnet" => ("MPNet", SequenceHead::Tanh),
            "electra" => ("Electra", SequenceHead::Gelu),
            "distilbert" => ("DistilBert", SequenceHead::Relu),
            "modernbert" => ("ModernBert", SequenceHead::Prediction),
            _ => return None,
        };
        Some(Self { prefix: mtl_nn::family_prefix(model_type)?, class, head })
    }

    /// The output layer of `…ForQuestionAnswering` (ModernBERT's is `classifier`).
    fn qa_outputs(&self) -> &'static str {
        match self.head {
            SequenceHead::Prediction => "classifier",
            _ => "qa_outputs",
        }
    }

    /// The modules of a sequence task's head outside the backbone, for PEFT's `modules_to_save`.
    fn sequence_modules(&self) -> &'static [&'static str] {
        match self.head {
            SequenceHead::Pooler => &["classifier", "pooler"],
            SequenceHead::Tanh | SequenceHead::Gelu => &["classifier"],
            SequenceHead::Relu => &["pre_classifier", "classifier"],
            SequenceHead::Context { .. } => &["pooler", "classifier"],
            SequenceHead::Prediction => &["head", "classifier"],
        }
    }
}

/// Tokenizer files copied from the checkpoint when it has them.
const TOKENIZER_FILES: [&str; 3] = ["vocab.txt", "special_tokens_map.json", "tokenizer_config.json"];

/// Writes each task of the run in `model_dir` as a transformers model directory `out/TASK/`; returns the tasks
/// written (a token task with a CRF is left out, with a warning).
pub fn export(model_dir: &Path, out: &Path) -> Result<Vec<String>> {
    if out.exists() {
        bail!("{}: the output directory already exists; choose another or remove it", out.display());
    }
    let run = Run::open(model_dir)?;
    run.require(Operation::Export)?;
    let loaded = run.into_encoder()?;
    let base_config: Value = read_json(&model_dir.join(checkpoint::MODEL_CONFIG))?;
    checkpoint::write_new_dir(out, |tmp| {
        let mut written = Vec::new();
        let mut bar = mtl_train::items::bar(loaded.config.tasks.len(), "exporting", "tasks");
        for task in loaded.config.tasks.keys() {
            let head = &loaded.model.heads()[task];
            if head.crf().is_some() {
                tracing::warn!("task `{task}` has a CRF head, which transformers cannot represent; it is not exported");
                if let Some(bar) = &mut bar {
                    bar.inc(1);
                }
                continue;
            }
            let dir = tmp.join(task.as_str());
            std::fs::create_dir(&dir).map_err(Error::io(&dir))?;
            write_task(&dir, &loaded, task, &base_config, model_dir)?;
            written.push(task.to_string());
            if let Some(bar) = &mut bar {
                bar.inc(1);
            }
        }
        if let Some(bar) = bar {
            bar.finish();
        }
        if written.is_empty() {
            bail!("{}: no task can be exported", model_dir.display());
        }
        Ok(written)
    })
}

/// The task as PEFT's adapter format (`adapter_config.json`, `adapter_model.safetensors`) on the original base
/// model: its LoRA adapter, and the head (with the export's pooler or its family's equivalent) as
/// `modules_to_save`.
#[allow(clippy::too_many_arguments)]
fn write_peft(
    dir: &Path,
    loaded: &Loaded,
    family: &Family,
    spec: &mtl_nn::LoraSpec,
    adapter: &str,
    kind: TaskKind,
    exported: &HashMap<String, Tensor>,
    model_dir: &Path,
) -> Result<()> {
    std::fs::create_dir(dir).map_err(Error::io(dir))?;
    let Some(base) = loaded.base.as_deref() else {
        bail!("{}: a LoRA run whose manifest names no base model", model_dir.display());
    };
    let model_type = &loaded.model.bert().config().model_type;
    let vars = loaded.model.params().vars();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    // AdaLoRA: the triplets each layer kept, by `MODULE.lora_E` (PEFT's `rank_pattern`).
    let mut rank_pattern = serde_json::Map::new();
    for (name, var, role) in loaded.model.params().with_roles() {
        if !matches!(role, mtl_core::ParamRole::Adapter { adapter: a, .. } if a == adapter) {
            continue;
        }
        // `….lora_A.ADAPTER.weight` → `base_model.model.bert.….lora_A.weight`: PEFT drops the adapter name
        // (only after `lora_A`/`lora_B`/`lora_E`: an adapter may be named like a module, `output`).
        let mut plain = name.clone();
        for m in ["A", "B", "E"] {
            plain = plain.replacen(&format!(".lora_{m}.{adapter}."), &format!(".lora_{m}."), 1);
        }
        let named = mtl_nn::family_name(model_type, &plain);
        if !spec.svd {
            tensors.insert(format!("base_model.model.{named}"), var.as_tensor().copy()?);
            continue;
        }
        // AdaLoRA's A, B and E are parameters, not modules (no `.weight`), and PEFT saves only the kept
        // triplets: the rows of A and E and the columns of B whose singular value E is not zero. The final
        // budget zeroes the pruned ones after every step, and a kept E of exactly zero adds nothing either, so
        // the saved adapter computes what the trained one does.
        let Some((layer, matrix)) = ["A", "B", "E"]
            .iter()
            .find_map(|m| name.strip_suffix(&format!(".lora_{m}.{adapter}.weight")).map(|layer| (layer, *m)))
        else {
            continue;
        };
        let e_name = format!("{layer}.lora_E.{adapter}.weight");
        let Some(e) = vars.get(&e_name) else {
            bail!("{}: the AdaLoRA run has no tensor `{e_name}`", model_dir.display());
        };
        let keep: Vec<bool> = e.as_tensor().flatten_all()?.to_vec1::<f32>()?.iter().map(|v| *v != 0.0).collect();
        let kept: Vec<u32> = (0..keep.len() as u32).filter(|&i| keep[i as usize]).collect();
        let axis = if matrix == "B" { 1 } else { 0 };
        let t = var.as_tensor();
        let sliced = match kept.len() {
            n if n == keep.len() => t.copy()?,
            0 => {
                let mut dims = t.dims().to_vec();
                dims[axis] = 0;
                Tensor::zeros(dims, t.dtype(), t.device())?
            }
            _ => t.index_select(&Tensor::new(kept.as_slice(), t.device())?, axis)?,
        };
        let param = named.trim_end_matches(".weight");
        tensors.insert(format!("base_model.model.{param}"), sliced);
        if matrix == "E" {
            rank_pattern.insert(param.to_string(), json!(keep));
        }
    }
    let saved: &[&str] = match kind {
        // ModernBERT's prediction head is in every task model.
        _ if family.head == SequenceHead::Prediction => &["head", "classifier"],
        TaskKind::TokenClassification => &["classifier"],
        TaskKind::QuestionAnswering => &["qa_outputs"],
        _ => family.sequence_modules(),
    };
    let (backbone, pooler) = (format!("{}.", family.prefix), format!("{}.pooler.", family.prefix));
    for (name, t) in exported {
        if !name.starts_with(&backbone) || name.starts_with(&pooler) {
            tensors.insert(format!("base_model.model.{name}"), t.clone());
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    // A regular expression on full module names: PEFT's suffix names cannot tell `output.dense` from
    // `attention.output.dense`. The family's names: `bert.encoder.layer.0.attention.self.query` is
    // `distilbert.transformer.layer.0.attention.q_lin` in DistilBERT, `model.layers.0.attn.Wqkv` in ModernBERT.
    let mut blocks = String::new();
    let mut modules = Vec::new();
    for target in &spec.targets {
        let full = mtl_nn::family_name(model_type, &loaded.model.bert().weight_name(0, *target));
        let Some((outer, inner)) = full.split_once(".0.") else {
            bail!("{}: cannot name LoRA's target `{}` in the family's names", model_dir.display(), target.bert_path());
        };
        blocks = regex_escape(outer);
        // ModernBERT's query, key and value are one module.
        let module = regex_escape(inner.trim_end_matches(".weight"));
        if !modules.contains(&module) {
            modules.push(module);
        }
    }
    let task_type = match kind {
        TaskKind::TokenClassification => "TOKEN_CLS",
        TaskKind::QuestionAnswering => "QUESTION_ANS",
        _ => "SEQ_CLS",
    };
    let mut config = json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": (f64::from(spec.dropout) * 1e6).round() / 1e6,
        "target_modules": format!("{blocks}\\.\\d+\\.({})", modules.join("|")),
        "modules_to_save": saved,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
    });
    if spec.svd {
        // PEFT's AdaLoRA: no `r` (the initial rank is `init_r`, and PEFT warns of an `r` set); it resizes each
        // layer to its pattern on load and keeps the scale `alpha / init_r` of training (`ranknum`). Its config
        // wants the run's length (`total_step`, with room for the schedule), which only training uses.
        let a = &loaded.config.peft.adalora;
        let metrics = read_json::<Value>(&model_dir.join(checkpoint::METRICS)).ok();
        let steps = metrics.and_then(|m| m["steps"].as_u64()).unwrap_or(0) as usize;
        config["peft_type"] = json!("ADALORA");
        if let Some(o) = config.as_object_mut() {
            o.remove("r");
        }
        config["init_r"] = json!(spec.r);
        config["target_r"] = json!(a.target_r);
        config["tinit"] = json!(a.tinit);
        config["tfinal"] = json!(a.tfinal);
        config["deltaT"] = json!(a.delta_t);
        config["beta1"] = json!(a.beta1);
        config["beta2"] = json!(a.beta2);
        config["orth_reg_weight"] = json!(a.orth_reg_weight);
        config["total_step"] = json!(steps.max(a.tinit + a.tfinal + 1));
        config["rank_pattern"] = Value::Object(rank_pattern);
    }
    write_text(&dir.join("adapter_config.json"), &pretty(&config))?;
    Ok(())
}

fn regex_escape(s: &str) -> String {
    s.replace('.', "\\.")
}

/// `(W, b)` of a square layer with an activation that is the identity above 8 (GELU, ReLU), and `c`: `W = I`,
/// `b = c`, with `c` per dimension above the largest value of the encoder's last LayerNorm (`γ n + β` with
/// `|n| ≤ √(H − 1)`: a normalised vector of H values with mean 0 and variance 1 has no entry beyond that) by 8.
fn shifted_identity(backbone: &BTreeMap<String, Tensor>, layers: usize, model_dir: &Path) -> Result<(Tensor, Tensor)> {
    let norm = |what: &str| -> Result<Vec<f32>> {
        let name = format!("encoder.layer.{}.output.LayerNorm.{what}", layers.saturating_sub(1));
        match backbone.get(&name) {
            Some(t) => Ok(t.to_vec1::<f32>()?),
            None => bail!("{}: the run has no tensor `{name}`", model_dir.display()),
        }
    };
    let (gamma, beta) = (norm("weight")?, norm("bias")?);
    let hidden = gamma.len();
    let reach = ((hidden.max(1) - 1) as f32).sqrt();
    let c: Vec<f32> = gamma.iter().zip(&beta).map(|(g, b)| g.abs() * reach + b.abs() + 8.0).collect();
    Ok((Tensor::eye(hidden, candle_core::DType::F32, &Device::Cpu)?, Tensor::from_vec(c, hidden, &Device::Cpu)?))
}

fn write_task(dir: &Path, loaded: &Loaded, task: &TaskId, base_config: &Value, model_dir: &Path) -> Result<()> {
    let model = &loaded.model;
    let head = &model.heads()[task];
    let map = &loaded.labels[task];
    let model_type = model.bert().config().model_type.clone();
    let Some(family) = Family::of(&model_type, base_config) else {
        bail!("{}: a `{model_type}` model cannot be exported", model_dir.display());
    };
    // The task's own LoRA adapter merged in (a shared one is merged at load already).
    let adapter = match model.bert().peft() {
        Some(spec) if spec.per_task() => Some(spec.adapter_of(task)?),
        _ => None,
    };
    let backbone = model.backbone_weights(adapter)?;
    let mut tensors: HashMap<String, Tensor> =
        backbone.iter().map(|(name, t)| (mtl_nn::family_name(&model_type, name), t.clone())).collect();
    let vars = model.params().vars();
    let head_param = |name: &str| -> Result<Tensor> {
        let full = format!("heads.{task}.{name}");
        match vars.get(&full) {
            Some(v) => Ok(v.as_tensor().copy()?),
            None => bail!("{}: the run has no tensor `{full}`", model_dir.display()),
        }
    };
    let (weight, bias) = (head_param("weight")?, head_param("bias")?);
    let hidden = model.bert().hidden_size();
    let ids: Vec<String> = match head.kind() {
        TaskKind::QuestionAnswering => Vec::new(),
        _ if map.labels().len() == head.num_labels() => map.labels().to_vec(),
        _ => (0..head.num_labels()).map(|i| format!("LABEL_{i}")).collect(),
    };
    let class = family.class;
    let (architecture, problem_type) = match head.kind() {
        TaskKind::Classification => (format!("{class}ForSequenceClassification"), Some("single_label_classification")),
        TaskKind::MultiLabel => (format!("{class}ForSequenceClassification"), Some("multi_label_classification")),
        TaskKind::Regression => (format!("{class}ForSequenceClassification"), Some("regression")),
        TaskKind::TokenClassification => (format!("{class}ForTokenClassification"), None),
        TaskKind::QuestionAnswering => (format!("{class}ForQuestionAnswering"), None),
        TaskKind::Generation => bail!("task `{task}`: generated text has no encoder head to export"),
    };
    let mut pooler_note = Value::Null;
    let mut config_pooling = None;
    match head.kind() {
        TaskKind::Classification | TaskKind::MultiLabel | TaskKind::Regression => {
            let (mut weight, mut bias) = (weight, bias);
            // Regression heads were trained on standardised targets: y = mean + std · (W x + b).
            if let (TaskKind::Regression, Some(scale)) = (head.kind(), &map.scale) {
                let n = scale.std.len();
                let std =
                    Tensor::from_vec(scale.std.iter().map(|&s| s as f32).collect::<Vec<_>>(), (n, 1), &Device::Cpu)?;
                let mean = Tensor::from_vec(scale.mean.iter().map(|&m| m as f32).collect::<Vec<_>>(), n, &Device::Cpu)?;
                weight = weight.broadcast_mul(&std)?;
                bias = ((bias * std.squeeze(1)?)? + mean)?;
            }
            let zeros = Tensor::zeros(hidden, candle_core::DType::F32, &Device::Cpu)?;
            let eye = (Tensor::eye(hidden, candle_core::DType::F32, &Device::Cpu)? * POOLER_EPS)?;
            // The layer between the first token's state and the classifier, made (nearly) the identity: its name,
            // `W`, `b`, and whether `b` shifts into an activation's linear range (else `W` scales by ε); and the
            // classifier's name. ModernBERT's is its prediction head, trained as it is.
            let (dense, out) = match family.head {
                SequenceHead::Pooler => (Some(("bert.pooler.dense", eye, zeros, false)), "classifier"),
                SequenceHead::Context { tanh: true } => (Some(("pooler.dense", eye, zeros, false)), "classifier"),
                SequenceHead::Tanh => (Some(("classifier.dense", eye, zeros, false)), "classifier.out_proj"),
                SequenceHead::Gelu | SequenceHead::Relu | SequenceHead::Context { tanh: false } => {
                    let layers = model.bert().config().num_hidden_layers;
                    let (eye, c) = shifted_identity(&backbone, layers, model_dir)?;
                    let (dense, out) = match family.head {
                        SequenceHead::Gelu => ("classifier.dense", "classifier.out_proj"),
                        SequenceHead::Relu => ("pre_classifier", "classifier"),
                        _ => ("pooler.dense", "classifier"),
                    };
                    (Some((dense, eye, c, true)), out)
                }
                SequenceHead::Prediction => (None, "classifier"),
            };
            pooler_note = json!(match &dense {
                Some((.., false)) => {
                    format!("near-identity: W = {POOLER_EPS} I, classifier weights divided by {POOLER_EPS}")
                }
                Some((.., true)) =>
                    "identity shifted into the activation's linear range: W = I, b = c; the classifier's bias less W c"
                        .into(),
                None => "ModernBERT's prediction head, as trained".into(),
            });
            let (weight, bias) = match &dense {
                // classifier(x + c) − W c = classifier(x).
                Some((_, _, c, true)) => {
                    let shift = weight.matmul(&c.unsqueeze(1)?)?.squeeze(1)?;
                    (weight, (bias - shift)?)
                }
                Some((.., false)) => ((weight / POOLER_EPS)?, bias),
                None => (weight, bias),
            };
            if let Some((name, w, b, _)) = dense {
                tensors.insert(format!("{name}.weight"), w);
                tensors.insert(format!("{name}.bias"), b);
            }
            tensors.insert(format!("{out}.weight"), weight);
            tensors.insert(format!("{out}.bias"), bias);
        }
        TaskKind::TokenClassification => {
            tensors.insert("classifier.weight".into(), weight);
            tensors.insert("classifier.bias".into(), bias);
        }
        TaskKind::QuestionAnswering | TaskKind::Generation => {
            let out = family.qa_outputs();
            tensors.insert(format!("{out}.weight"), weight);
            tensors.insert(format!("{out}.bias"), bias);
        }
    }
    if head.has_prediction_head() {
        for name in ["dense.weight", "dense.bias", "norm.weight", "norm.bias"] {
            // Biases only where the config has them (`classifier_bias`, `norm_bias`).
            if let Some(v) = vars.get(&format!("heads.{task}.head.{name}")) {
                tensors.insert(format!("head.{name}"), v.as_tensor().copy()?);
            }
        }
        // The pooling mtl's heads were trained with (the first token's state unless the config says the mean).
        let mean = model.bert().config().modern.as_ref().is_some_and(|m| m.mean_pooling);
        config_pooling = Some(if mean { "mean" } else { "cls" });
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    if let Some((spec, lora)) = model.bert().peft().and_then(|p| p.lora().map(|l| (p, l))) {
        let name = &spec.adapters[spec.adapter_of(task)?];
        write_peft(&dir.join("peft"), loaded, &family, lora, name, head.kind(), &tensors, model_dir)?;
    }

    let mut config = base_config.clone();
    config["architectures"] = json!([architecture]);
    if model_type == "distilbert" {
        // DistilBERT's own name for the depth (a run's config.json holds the model's depth beside it).
        if let Some(o) = config.as_object_mut() {
            if let Some(depth) = o.remove("num_hidden_layers") {
                o.insert("n_layers".into(), depth);
            }
        }
    }
    if !ids.is_empty() {
        config["id2label"] =
            ids.iter().enumerate().map(|(i, l)| (i.to_string(), json!(l))).collect::<serde_json::Map<_, _>>().into();
        config["label2id"] =
            ids.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect::<serde_json::Map<_, _>>().into();
    }
    if let Some(p) = problem_type {
        config["problem_type"] = json!(p);
    }
    if let Some(pooling) = config_pooling {
        config["classifier_pooling"] = json!(pooling);
    }
    if head.kind() == TaskKind::QuestionAnswering {
        // Start and end logits: two outputs, whatever labels the base model's config carried.
        if let Some(o) = config.as_object_mut() {
            for key in ["id2label", "label2id", "num_labels"] {
                o.remove(key);
            }
        }
    }
    config["mtl"] = json!({
        "task": task.as_str(),
        "pooler": pooler_note,
        "max_len": loaded.config.model.max_len,
    });
    write_text(&dir.join("config.json"), &pretty(&config))?;
    // The tokenizer, without the fixed padding and truncation some tokenizer.json files carry: transformers'
    // callers choose those per call.
    let path = model_dir.join(checkpoint::TOKENIZER);
    let mut tokenizer: Value = read_json(&path)?;
    tokenizer["padding"] = Value::Null;
    tokenizer["truncation"] = Value::Null;
    write_text(&dir.join(checkpoint::TOKENIZER), &tokenizer.to_string())?;
    let mut tokenizer_config = json!({});
    for name in TOKENIZER_FILES {
        let from = model_dir.join(name);
        if !from.exists() {
            continue;
        }
        if name == "tokenizer_config.json" {
            tokenizer_config = serde_json::from_str(&read_text(&from)?).map_err(Error::invalid(&from))?;
        } else {
            std::fs::copy(&from, dir.join(name)).map_err(Error::io(&from))?;
        }
    }
    tokenizer_config["model_max_length"] = json!(loaded.config.model.max_len);
    write_text(&dir.join("tokenizer_config.json"), &pretty(&tokenizer_config))
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("JSON values serialize; this is a bug")
}
