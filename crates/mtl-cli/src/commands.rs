//! Each command: its arguments resolved, one library call, and what it prints.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result};
use mtl::{Config, Input, Location, PredictOptions, Run, ServeConfig, TrainOptions};

use crate::args::{Cli, Command, Select, ServeFlags};
use crate::report;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            config,
            out,
            overrides,
            tasks,
            select,
            resume,
            accept_changed_data,
            baselines,
            stop_after_epoch,
        } => {
            let mut c = Config::load(&config, &overrides)?;
            if !tasks.is_empty() {
                c.retain_tasks(&tasks, &config)?;
            }
            let select = match select {
                Select::Joint => mtl::Select::Joint,
                Select::PerTask => mtl::Select::PerTask,
            };
            let options = TrainOptions { select, resume, accept_changed_data, baselines, stop_after_epoch };
            let training = mtl::train_with(&c, &config, &out, &options, &mut print_run)?;
            if let Some(b) = &training.baselines {
                print_baselines(b);
            }
        }
        Command::Update { model, config, out, overrides } => {
            let r = mtl::update(&model, &config, &out, &overrides)?;
            println!("task\tsplit\tmetric\tbefore\tafter\tchange (points)");
            for c in &r.changes {
                let role = if c.updated { " (updated)" } else { "" };
                println!(
                    "{}{role}\t{}\t{}\t{:.4}\t{:.4}\t{:+.2}",
                    c.task,
                    c.split,
                    c.metric,
                    c.before,
                    c.after,
                    c.points()
                );
            }
            eprintln!(
                "updated {} on {} examples ({} of the other tasks' replayed) in {:.0} s; wrote {}",
                r.updated.join(", "),
                r.train_examples,
                r.rehearsed,
                r.seconds,
                out.display()
            );
        }
        Command::Tune { config, space, out, overrides, resume } => {
            let exe = std::env::current_exe().context("cannot find the mtl binary for the trials")?;
            let mut runner = mtl::tune::ProcessRunner { exe };
            let report = mtl::tune::tune(&config, &space, &out, &overrides, resume, &mut runner, &mut |state, t| {
                let best = t.best(state.space.search.mode).map_or("-".to_string(), |b| format!("{b:.4}"));
                eprintln!(
                    "trial {:>3}: {:>2} / {} epochs, {:?}, best {best} ({} epochs trained in all)",
                    t.id,
                    t.trained,
                    t.epochs,
                    t.status,
                    state.spent_epochs()
                );
            })?;
            let mode = report.state.space.search.mode;
            if let Some(best) = report.state.best() {
                println!(
                    "best: trial {} with {} {:.4} after {} epochs ({})",
                    best.id,
                    report.state.space.search.metric.as_deref().unwrap_or("selection score"),
                    best.best(mode).unwrap_or(f64::NAN),
                    best.trained,
                    best.params
                        .iter()
                        .map(|(k, v)| format!("{k}={}", mtl::tune::toml_value(v)))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            if let Some(path) = &report.best {
                println!("wrote {} (and report.html, trials.jsonl)", path.display());
            }
        }
        Command::Init { data, out, model, force } => {
            if out.exists() && !force {
                anyhow::bail!("{}: exists; choose another --out or give --force", out.display());
            }
            let report = mtl::init(&data, &out, model.as_deref())?;
            if let Some(folder) = out.parent().filter(|f| !f.as_os_str().is_empty()) {
                std::fs::create_dir_all(folder).with_context(|| format!("cannot create {}", folder.display()))?;
            }
            std::fs::write(&out, &report.text).with_context(|| format!("cannot write {}", out.display()))?;
            for guess in &report.guesses {
                eprintln!("guessed: {guess}");
            }
            eprintln!(
                "wrote {} with {} task(s): {}; train with `mtl train {} --out runs/NAME`",
                out.display(),
                report.tasks.len(),
                report.tasks.join(", "),
                out.display()
            );
        }
        Command::Check { config, overrides, json, no_estimate } => {
            let report = mtl::check_with(&Config::load(&config, &overrides)?, &config, !no_estimate)?;
            match json {
                true => println!("{}", serde_json::to_string_pretty(&report)?),
                false => print!("{report}"),
            }
        }
        Command::Eval { model, config, overrides, drift_reference } => {
            mtl::show_item_progress(true);
            let run = Run::open(&model)?;
            // The run's own config (its data files as given when it trained) unless another is named.
            let config = config.unwrap_or_else(|| model.join(mtl::RUN_CONFIG));
            let loaded = Config::load(&config, &overrides)?;
            let scores = run.evaluate(&loaded, &config)?;
            println!("{}", serde_json::to_string_pretty(&scores)?);
            if drift_reference {
                let path = run.write_drift_reference(&loaded, &config)?;
                tracing::info!("wrote {}", path.display());
            }
        }
        Command::Predict { model, input, batch_size, full_precision } => {
            mtl::show_item_progress(true);
            predict(&model, input.as_deref(), &PredictOptions { batch_size, full_precision })?
        }
        Command::Explain { model, input, tasks, steps, baseline, all_words, html } => explain(
            &model,
            input.as_deref(),
            &mtl::ExplainOptions { steps, baseline, tasks, all_words },
            html.as_deref(),
        )?,
        Command::Info { model } => {
            let run = Run::open(&model)?;
            let info = serde_json::json!({"manifest": run.manifest(), "capabilities": run.capabilities()});
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <crate::args::Cli as clap::CommandFactory>::command(),
                "mtl",
                &mut std::io::stdout(),
            );
        }
        Command::Export { model, out } => {
            mtl::show_item_progress(true);
            let written = mtl::export(&model, &out)?;
            println!("exported {} to {}", written.join(", "), out.display());
        }
        Command::Generate { model, prompt, chat, system, max_new_tokens, temperature, top_k, top_p, seed, stop } => {
            let sampling = mtl::Sampling { temperature, top_k, top_p, seed };
            mtl::check_sampling(&sampling)?;
            let decoder = mtl::open_decoder(&model)?;
            let prompt = match prompt {
                Some(p) => p,
                None => {
                    std::io::read_to_string(std::io::stdin()).context("cannot read the prompt from standard input")?
                }
            };
            let request = mtl::GenerateRequest { prompt, chat, system, sampling, max_new_tokens, stop };
            let mut out = std::io::stdout().lock();
            let done = decoder
                .generate(&request, |piece| out.write_all(piece.as_bytes()).and_then(|()| out.flush()).is_ok())?;
            writeln!(out)?;
            tracing::info!(
                prompt_tokens = done.prompt_tokens,
                new_tokens = done.new_tokens,
                stop = done.stop,
                "{:.1} tokens/s",
                done.new_tokens as f64 / done.seconds.max(1e-9)
            );
        }
        Command::Quantize { model, out, config } => {
            print_transform(&mtl::quantize(&model, &out, config.as_deref())?, &out)?
        }
        Command::Prune { model, layers, out, config } => {
            print_transform(&mtl::prune(&model, layers, &out, config.as_deref())?, &out)?
        }
        Command::Serve { model, config, flags } => {
            let mut s = match &config {
                Some(path) => ServeConfig::load(path)?,
                None => ServeConfig::default(),
            };
            s.merge(flags.into_overrides());
            s.validate(config.as_deref().unwrap_or(Path::new("(flags)")))?;
            mtl::serve::serve(&model, &s)?;
        }
        Command::AddTask { model, config, out, overrides } => {
            let r = mtl::add_task(&model, &config, &out, &overrides)?;
            for (split, eval) in [("dev", &r.dev), ("test", &r.test)] {
                for (task, scores) in eval.iter().flat_map(|e| &e.scores) {
                    println!("{split} {task}: {}", serde_json::to_string(scores)?);
                }
            }
            println!(
                "added {} ({} trained parameters, everything else frozen) in {:.0} s; model with all {} tasks in {}",
                r.added.join(", "),
                r.trained_params,
                r.seconds,
                r.tasks,
                out.display()
            );
        }
    }
    Ok(())
}

impl ServeFlags {
    fn into_overrides(self) -> mtl::ServeOverrides {
        mtl::ServeOverrides {
            addr: self.addr,
            max_batch_tokens: self.max_batch_tokens,
            max_wait_ms: self.max_wait_ms,
            queue_bound: self.queue_bound,
            max_input_chars: self.max_input_chars,
            max_inputs: self.max_inputs,
            body_limit: self.body_limit,
            timeout_s: self.timeout_s,
            api_keys: self.api_keys,
            threads: self.threads,
            allowed_hosts: self.allowed_hosts,
            cors_origins: self.cors_origins,
            header_timeout_s: self.header_timeout_s,
            max_connections: self.max_connections,
            shutdown_timeout_s: self.shutdown_timeout_s,
            max_sequences: self.max_sequences,
            prefill_chunk: self.prefill_chunk,
            kv_cache_mb: self.kv_cache_mb,
            kv_block: self.kv_block,
            prefix_cache: self.prefix_cache,
            drift_window: self.drift_window,
            drift_threshold: self.drift_threshold,
            request_log: self.request_log,
            request_log_sample: self.request_log_sample,
            explain: self.explain,
        }
    }
}

/// A finished run's scores, as each run ends.
fn print_run(r: &mtl::TrainReport) {
    let mut shown = Vec::new();
    if let Some(d) = &r.dev {
        shown.push(("dev", &d.scores));
    }
    if let Some(t) = &r.test {
        shown.push(("test", &t.scores));
        if !r.architecture.is_decoder() {
            for (task, report) in &t.reports {
                println!("test: {task}\n{}", mtl::format_report(report));
            }
        }
    }
    print!("{}", report::table(&shown));
    let best = match &r.composed {
        Some(steps) => {
            let steps: Vec<String> = steps.iter().map(|(t, s)| format!("{t} {s}")).collect();
            format!("each task's adapter and head from its own best evaluation (step {}", steps.join(", "))
        }
        None => format!("best epoch {} of {} (step {}", r.best_epoch, r.epochs, r.best_step),
    };
    let what = if r.architecture.is_decoder() { "adapters" } else { "checkpoint" };
    println!(
        "{best} of {}{}); trained in {:.0} s; {what} and metrics.json in {}",
        r.steps,
        if r.stopped_early { ", stopped early" } else { "" },
        r.seconds,
        r.out.display()
    );
    if r.skipped_steps > 0 {
        tracing::warn!("{} steps were skipped for NaN or infinite losses or gradients", r.skipped_steps);
    }
}

/// The negative-transfer table of `--baselines`.
fn print_baselines(b: &mtl::Baselines) {
    let f = |v: Option<f64>| v.unwrap_or(f64::NAN);
    println!("negative transfer ({}; joint − alone, per task's main metric):", b.split);
    println!("{:<16} {:<12} {:>8} {:>8} {:>8}", "task", "metric", "joint", "alone", "Δ");
    for (task, r) in &b.tasks {
        println!("{task:<16} {:<12} {:>8.4} {:>8.4} {:>+8.4}", r.metric, f(r.joint), f(r.alone), f(r.delta));
    }
    let m = &b.mean;
    println!("{:<16} {:<12} {:>8.4} {:>8.4} {:>+8.4}", "mean", "", m.joint, m.alone, m.delta);
}

fn print_transform(report: &mtl::TransformReport, out: &Path) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&report.changes)?);
    println!("written to {}", out.display());
    Ok(())
}

/// The non-empty lines of `input` (standard input when `None`), each parsed as `run` reads an input, with its
/// location.
fn input_lines<'a>(run: &'a Run, input: Option<&Path>) -> Result<impl Iterator<Item = Result<(Location, Input)>> + 'a> {
    let reader: Box<dyn BufRead> = match input {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let source = input.map_or_else(|| "<stdin>".into(), Path::to_path_buf);
    Ok(reader.lines().enumerate().filter_map(move |(i, line)| {
        let location = Location { path: source.clone(), line: i + 1 };
        let line = match line.with_context(|| format!("{}: cannot read", source.display())) {
            Ok(line) if line.trim().is_empty() => return None,
            Ok(line) => line,
            Err(e) => return Some(Err(e)),
        };
        Some(run.parse_input(&line, &location).map(|input| (location, input)).map_err(Into::into))
    }))
}

/// Explains each input line and prints one JSON object per input; with `html`, also the page of them all.
fn explain(model: &Path, input: Option<&Path>, options: &mtl::ExplainOptions, html: Option<&Path>) -> Result<()> {
    let run = Run::open_for_explanations(model)?;
    let mut out = std::io::stdout().lock();
    let mut all = Vec::new();
    for located in input_lines(&run, input)? {
        for explanation in run.explain(&[located?], options)? {
            writeln!(out, "{}", serde_json::to_string(&explanation)?)?;
            out.flush()?;
            if html.is_some() {
                all.push(explanation);
            }
        }
    }
    if let Some(path) = html {
        let title = format!("Explanations of {}", model.display());
        std::fs::write(path, mtl::explanation_html(&all, &title))
            .with_context(|| format!("{}: cannot write", path.display()))?;
        tracing::info!("wrote {}", path.display());
    }
    Ok(())
}

/// Reads inputs a line at a time, predicts them in groups and prints one JSON object per input.
fn predict(model: &Path, input: Option<&Path>, options: &PredictOptions) -> Result<()> {
    let run = Run::open(model)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut pending: Vec<(Location, Input)> = Vec::new();
    let flush = |pending: &mut Vec<(Location, Input)>, out: &mut dyn Write| -> Result<()> {
        for record in run.predict_located(pending, options)? {
            writeln!(out, "{}", serde_json::to_string(&record)?)?;
        }
        pending.clear();
        Ok(())
    };
    for located in input_lines(&run, input)? {
        pending.push(located?);
        if pending.len() >= options.batch_size.max(1) * 4 {
            flush(&mut pending, &mut out)?;
        }
    }
    flush(&mut pending, &mut out)?;
    out.flush()?;
    Ok(())
}
