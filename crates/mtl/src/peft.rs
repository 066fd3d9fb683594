//! `[peft]` of a run config as each backbone takes it: one place decides the adapters (one shared by every
//! task, or one per task), the method and its settings, for the encoder and the decoder alike.

use mtl_config::{AdapterPlacement, Config, PeftConfig, PeftMethod};
use mtl_nn::llama::{DecoderLora, DecoderModule};
use mtl_nn::{BertConfig, LoraSpec, PeftKind, PeftSpec, Placement, SHARED_ADAPTER};

use crate::Architecture;

/// The adapter names: one per task (its name), or the one shared adapter.
pub(crate) fn adapter_names(config: &Config) -> Vec<String> {
    match config.peft.per_task {
        true => config.tasks.keys().map(|t| t.to_string()).collect(),
        false => vec![SHARED_ADAPTER.to_string()],
    }
}

fn lora(p: &PeftConfig) -> LoraSpec {
    LoraSpec {
        r: p.r,
        alpha: p.alpha,
        dropout: p.dropout as f32,
        targets: p.target_modules.clone(),
        svd: p.method == PeftMethod::Adalora,
    }
}

/// The encoder's parameter-efficient method, or `None` for full fine-tuning.
pub(crate) fn encoder_spec(config: &Config, bert: &BertConfig) -> Option<PeftSpec> {
    let p = &config.peft;
    let kind = match p.method {
        PeftMethod::None => return None,
        PeftMethod::Lora | PeftMethod::Adalora => PeftKind::Lora(lora(p)),
        PeftMethod::Prefix => PeftKind::Prefix { length: p.prefix_length },
        PeftMethod::Adapter => PeftKind::Bottleneck {
            size: (bert.hidden_size / p.reduction_factor).max(1),
            placement: match p.placement {
                AdapterPlacement::Pfeiffer => Placement::Pfeiffer,
                AdapterPlacement::Houlsby => Placement::Houlsby,
            },
        },
    };
    Some(PeftSpec { kind, adapters: adapter_names(config) })
}

/// The decoder's LoRA (on all seven projections), or `None` for full fine-tuning.
pub(crate) fn decoder_lora(config: &Config) -> Option<DecoderLora> {
    if !config.peft.enabled() {
        return None;
    }
    Some(DecoderLora {
        spec: LoraSpec { targets: Vec::new(), ..lora(&config.peft) },
        modules: DecoderModule::ALL.to_vec(),
        adapters: adapter_names(config),
    })
}

/// Whether `[peft]` asks for something `architecture` does not implement; the message names the field.
pub(crate) fn unsupported(config: &Config, architecture: Architecture) -> Option<(&'static str, String)> {
    let p = &config.peft;
    if !architecture.is_decoder() || !p.enabled() {
        return None;
    }
    if !matches!(p.method, PeftMethod::Lora | PeftMethod::Adalora) {
        return Some((
            "peft.method",
            "decoder models train with LoRA or AdaLoRA (or fully, without [peft]); bottleneck adapters and prefixes are not supported on them yet".into(),
        ));
    }
    if p.target_modules != PeftConfig::default().target_modules {
        return Some((
            "peft.target_modules",
            "names BERT layers; on a decoder LoRA adapts all seven projections (q, k, v, o, gate, up, down)".into(),
        ));
    }
    None
}
