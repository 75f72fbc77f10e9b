//! `lowbit finetune`: QLoRA fine-tuning of LoRA adapters on a frozen (quantized) Llama-family model, on the
//! CPU or the GPU (`--device gpu`: forward and backward on the GPU, the optimizer on the host), writing a PEFT
//! adapter directory.
//!
//! Data: the text is tokenized without special tokens (or `--tokens` is taken as is) and cut into consecutive
//! windows of `--ctx` tokens (a last window shorter than 2 tokens is dropped). Step `n` (from 1) runs the
//! `--batch` windows `(n−1)·B .. n·B` (cycling over the windows); its loss is the mean next-token
//! cross-entropy over every predicted position of the batch, before that step's update.

use crate::console;
use crate::error::CliError;
use crate::gpu::Device;
use crate::llm::ModelArgs;
use lowbit::optim::{OptimizerConfig, OptimizerKind};
use lowbit_llm::train::{init_adapters, LoraInit, Trainer};
use std::path::Path;
use std::time::Instant;

/// What `lowbit finetune` was asked to do.
pub struct Finetune<'a> {
    pub model: &'a ModelArgs,
    pub text: Option<&'a Path>,
    pub tokens: Option<&'a [u32]>,
    pub adapter_out: &'a Path,
    pub double_quant: bool,
    pub targets: Option<&'a [String]>,
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    pub use_rslora: bool,
    pub lr: f64,
    pub lora_plus_ratio: f64,
    pub optimizer: OptimizerKind,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    pub steps: usize,
    pub ctx: usize,
    pub batch: usize,
    pub seed: u64,
    pub force: bool,
}

/// Default LoRA settings for a new adapter (PEFT's r = 8, alpha = 16 on the attention's q and v).
const DEFAULT_TARGETS: [&str; 2] = ["q_proj", "v_proj"];
const DEFAULT_RANK: usize = 8;
const DEFAULT_ALPHA: f32 = 16.0;

/// Trains, printing `step N loss X …` per step, and writes the adapter.
pub fn run(f: Finetune) -> Result<(), CliError> {
    if f.model.act8 {
        return Err(CliError::new("--act8 is an inference mode; training runs in f32 (drop --act8)"));
    }
    if f.ctx < 2 || f.batch == 0 || f.steps == 0 {
        return Err(CliError::new(format!(
            "--ctx {} --batch {} --steps {}: expected a context of at least 2 tokens, a batch ≥ 1 and steps ≥ 1",
            f.ctx, f.batch, f.steps
        )));
    }
    let continuing = !f.model.adapter.is_empty();
    if continuing && (f.targets.is_some() || f.rank.is_some() || f.alpha.is_some() || f.use_rslora) {
        return Err(CliError::new(
            "--adapter continues training an existing adapter with its own targets, rank and alpha: drop --targets / --rank / --alpha / --use-rslora",
        ));
    }
    if continuing && f.model.adapter.len() > 1 {
        return Err(CliError::new(
            "give one --adapter to continue from (several would be trained together and saved as one)",
        ));
    }
    check_adapter_out(&f)?;
    let mut args = f.model.clone();
    if f.double_quant {
        args.scheme = match args.scheme {
            Some(lowbit::Scheme::FourBit { format, blocksize, .. }) => {
                Some(lowbit::Scheme::FourBit { format, blocksize, double_quant: true })
            }
            _ => {
                return Err(CliError::new(
                    "--double-quant needs a 4-bit --scheme (e.g. --scheme nf4 --double-quant, the same as --scheme nf4:64+dq)",
                ))
            }
        };
    }
    let optim = OptimizerConfig {
        weight_decay: f.weight_decay,
        lora_plus_ratio: f.lora_plus_ratio,
        max_grad_norm: f.max_grad_norm,
        ..OptimizerConfig::new(f.optimizer, f.lr)
    };
    optim.validate()?;
    let ids: Vec<u32> = match (f.text, f.tokens) {
        (Some(path), _) => {
            let text = crate::perplexity::read_text(path)?;
            // Tokenized after loading (the tokenizer comes with the model).
            return train(f, &args, optim, Data::Text(text), continuing);
        }
        (None, Some(t)) => t.to_vec(),
        (None, None) => return Err(CliError::new("give the training data: --text FILE or --tokens ID,…")),
    };
    train(f, &args, optim, Data::Tokens(ids), continuing)
}

enum Data {
    Text(String),
    Tokens(Vec<u32>),
}

fn train(f: Finetune, args: &ModelArgs, optim: OptimizerConfig, data: Data, continuing: bool) -> Result<(), CliError> {
    let mut loaded = crate::llm::load(args)?;
    let ids = match data {
        Data::Text(t) => loaded.tokenizer.encode(&t, false)?,
        Data::Tokens(t) => t,
    };
    let windows: Vec<&[u32]> = ids.chunks(f.ctx).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        return Err(CliError::new(format!("the training data has {} tokens: need at least 2", ids.len())));
    }
    let model = &mut loaded.model;
    let (rank, alpha, rslora) = if continuing {
        let ads = model.adapter_modules();
        let first = ads.first().ok_or_else(|| CliError::new("the --adapter attached no LoRA module to this model"))?.1;
        (first.rank(), first.alpha(), first.use_rslora())
    } else {
        let targets: Vec<String> = match f.targets {
            Some(t) => t.to_vec(),
            None => DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
        };
        let init = LoraInit {
            targets,
            rank: f.rank.unwrap_or(DEFAULT_RANK),
            alpha: f.alpha.unwrap_or(DEFAULT_ALPHA),
            use_rslora: f.use_rslora,
            seed: f.seed,
            name: "default".into(),
        };
        let n = init_adapters(model, &init)?;
        eprintln!(
            "new LoRA adapter: r = {}, alpha = {}{}, on {} modules ({}), A Kaiming-uniform (seed {}), B zero",
            init.rank,
            init.alpha,
            if init.use_rslora { ", rsLoRA" } else { "" },
            n,
            init.targets.join(","),
            f.seed
        );
        (init.rank, init.alpha, init.use_rslora)
    };
    let mut trainer = Trainer::new(model, optim)?;
    let mut engine = Engine::new(args.device, model, f.ctx)?;
    eprintln!(
        "training: {} windows of ≤ {} tokens ({} tokens), batch {}, {} steps, {} lr {} (B: ×{}{}){}, on {}",
        windows.len(),
        f.ctx,
        ids.len(),
        f.batch,
        f.steps,
        optim.kind.name(),
        optim.lr,
        optim.lora_plus_ratio,
        if optim.lora_plus_ratio != 1.0 { ", LoRA+" } else { "" },
        optim.max_grad_norm.map_or(String::new(), |g| format!(", grad norm clipped at {g}")),
        engine.describe()
    );
    let start = Instant::now();
    for step in 1..=f.steps {
        let batch: Vec<&[u32]> = (0..f.batch).map(|j| windows[((step - 1) * f.batch + j) % windows.len()]).collect();
        let t = Instant::now();
        let r = engine.step(&mut trainer, model, &batch)?;
        let secs = t.elapsed().as_secs_f64();
        console::line(&format!(
            "step {step} loss {:.6} grad_norm {:.4} tokens/s {:.1} ({:.2} s)",
            r.loss,
            r.stats.grad_norm,
            r.tokens as f64 / secs.max(1e-9),
            secs
        ))?;
    }
    let modules: Vec<(String, &lowbit::lora::LoraAdapter)> = model.adapter_modules();
    let config =
        lowbit::io::peft::AdapterSaveConfig { base_model_name_or_path: None, overwrite: f.force, ..Default::default() };
    lowbit::io::peft::save_adapter(f.adapter_out, &config, &modules)?;
    eprintln!(
        "wrote {} (PEFT LoRA: r = {rank}, alpha = {alpha}{}, {} modules) after {:.1} s",
        console::escape(&f.adapter_out.display().to_string()),
        if rslora { ", rsLoRA" } else { "" },
        modules.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Where the forward and backward of a step run.
enum Engine {
    Cpu,
    #[cfg(feature = "gpu")]
    Gpu {
        ctx: Box<lowbit::gpu::GpuContext>,
        model: Box<lowbit_llm::gpu::GpuModel>,
    },
}

impl Engine {
    /// The CPU, or the model uploaded to the preferred GPU adapter for windows of up to `ctx` tokens.
    fn new(device: Device, model: &lowbit_llm::Model, ctx: usize) -> Result<Engine, CliError> {
        match device {
            Device::Cpu => Ok(Engine::Cpu),
            #[cfg(feature = "gpu")]
            Device::Gpu => {
                let (ctx, model) = crate::llm::upload_gpu(model, ctx, 1)?;
                Ok(Engine::Gpu { ctx, model })
            }
            #[cfg(not(feature = "gpu"))]
            Device::Gpu => {
                let _ = (model, ctx);
                Err(crate::gpu::not_built())
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Engine::Cpu => format!("the CPU ({} threads)", rayon::current_num_threads()),
            #[cfg(feature = "gpu")]
            Engine::Gpu { ctx, .. } => {
                format!("the GPU ({}; optimizer on the host)", console::escape(ctx.adapter_name()))
            }
        }
    }

    fn step(
        &mut self,
        trainer: &mut Trainer,
        model: &mut lowbit_llm::Model,
        batch: &[&[u32]],
    ) -> Result<lowbit_llm::train::StepReport, CliError> {
        Ok(match self {
            Engine::Cpu => trainer.step(model, batch)?,
            #[cfg(feature = "gpu")]
            Engine::Gpu { ctx, model: gpu } => trainer.step_gpu(ctx, gpu, model, batch)?,
        })
    }
}

/// Refuses, before any work: an `--adapter-out` whose parent directory does not exist, one that is the model
/// or an input adapter (never replaced, even with --force), an existing path without --force, or an existing
/// path that is not a directory.
fn check_adapter_out(f: &Finetune) -> Result<(), CliError> {
    let out = f.adapter_out;
    let parent = lowbit::io::atomic::parent_dir(out);
    if !parent.is_dir() {
        return Err(CliError::new(format!(
            "cannot write {}: directory {} does not exist",
            out.display(),
            parent.display()
        )));
    }
    let mut inputs: Vec<(&Path, &str)> = vec![(f.model.model.as_path(), "the model")];
    inputs.extend(f.model.adapter.iter().map(|a| (a.as_path(), "an input adapter")));
    crate::output::protect_inputs(&inputs, out)?;
    match std::fs::metadata(out) {
        Err(_) => Ok(()),
        Ok(m) if !m.is_dir() => {
            Err(CliError::new(format!("--adapter-out {} exists and is not a directory", out.display())))
        }
        Ok(_) if !f.force => {
            Err(CliError::new(format!("--adapter-out {} already exists; pass --force to replace it", out.display())))
        }
        Ok(_) => Ok(()),
    }
}
