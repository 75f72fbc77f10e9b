//! `lowbit`: quantize, dequantize and inspect safetensors checkpoints, and demonstrate the kernels.
//!
//! This file holds the command-line definitions (clap derive) and the dispatch; each command lives in its own
//! module. Every error is printed as `error: <message>` and exits with status 1; usage errors from clap exit
//! with status 2.

mod demo;
mod dequantize;
mod error;
mod inspect;
mod int8_layout;
mod output;
mod progress;
mod quantize;
mod stats;
mod table;

use clap::{Parser, Subcommand, ValueEnum};
use error::CliError;
use std::path::PathBuf;
use std::process::ExitCode;

const QUANTIZE_LONG_ABOUT: &str = "\
Quantizes every floating-point tensor (F32, F16, BF16) with two or more dimensions; every other tensor
(1-D biases and norms, integer tensors, F64) is copied unchanged. The input file is memory-mapped and never
modified; the output is written to a temporary file next to OUT and renamed into place.

int8 layout (scheme `int8`, asymmetric affine, PyTorch quint8 semantics). A tensor of shape [d0, .., dn] is
seen as a row-major matrix with dn columns. For each quantized weight NAME the output holds:

  NAME             U8  [d0, .., dn]   the codes q, same shape as the weight
  NAME.scale       F32 [n]            one scale per tensor / row / group, row-major
  NAME.zero_point  U8  [n]            one zero point per entry, aligned with NAME.scale

with n = 1 (tensor), rows (channel) or rows * ceil(cols / G) (group:G; entry r * ceil(cols / G) + j is group j
of row r; groups never cross rows). A value is recovered as (q - zero_point) * scale in f32.

The header's __metadata__ records:

  lowbit.scheme       = int8
  lowbit.granularity  = tensor | channel | group:G
  lowbit.dtype.NAME   = float32 | float16 | bfloat16   (source dtype of each quantized weight)

`lowbit dequantize` and `lowbit inspect` read this layout back.";

const DEQUANTIZE_LONG_ABOUT: &str = "\
Reads a file written by `lowbit quantize --scheme int8` and writes every quantized weight back under its own
name as floating point (f32 unless --dtype is given), dropping the NAME.scale and NAME.zero_point entries and
copying every other tensor unchanged. The input is memory-mapped and never modified.";

const INSPECT_LONG_ABOUT: &str = "\
Lists the tensors of a safetensors file: name, stored dtype, shape, format (int8 tensor/channel/group:G or
plain) and storage cost in bits per weight (parameters included). A quantized weight's .scale/.zero_point
entries are folded into its row.

With --compare ORIGINAL, every quantized tensor is dequantized and compared with the tensor of the same name
in ORIGINAL: maximum and mean absolute error and the signal-to-quantization-noise ratio
SQNR = 10 log10(sum x^2 / sum (x - x_hat)^2) in dB.";

/// Low-bit quantization of LLM weights: int8 affine (PyTorch quint8) and NF4 (bitsandbytes), exact on every CPU.
#[derive(Parser, Debug)]
#[command(name = "lowbit", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Quantize a synthetic 4096x4096 weight through every CPU path, check each against the scalar reference
    /// and print speed and error.
    Demo {
        /// Rows and columns of the synthetic matrix (for quick checks).
        #[arg(long, default_value_t = 4096, hide = true, value_parser = clap::value_parser!(u32).range(1..=65536))]
        size: u32,
    },
    /// Quantize the floating-point weights of a safetensors file.
    #[command(long_about = QUANTIZE_LONG_ABOUT)]
    Quantize {
        /// Input safetensors file.
        input: PathBuf,
        /// Output safetensors file.
        #[arg(short, long)]
        output: PathBuf,
        /// Quantization scheme.
        #[arg(long, value_enum, default_value_t = Scheme::Int8)]
        scheme: Scheme,
        /// Which values share a scale and zero point: `tensor`, `channel` (one per row) or `group:G` (G
        /// consecutive values along a row).
        #[arg(long, default_value = "channel", value_parser = parse_granularity)]
        granularity: lowbit::affine::Granularity,
        /// Replace OUTPUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Turn a quantized safetensors file back into floating point.
    #[command(long_about = DEQUANTIZE_LONG_ABOUT)]
    Dequantize {
        /// Input safetensors file (written by `lowbit quantize`).
        input: PathBuf,
        /// Output safetensors file.
        #[arg(short, long)]
        output: PathBuf,
        /// Element type of the dequantized weights.
        #[arg(long, value_parser = parse_dtype)]
        dtype: Option<lowbit::DType>,
        /// Replace OUTPUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// List the tensors of a safetensors file and their formats; optionally measure the error vs an original.
    #[command(long_about = INSPECT_LONG_ABOUT)]
    Inspect {
        /// The file to list.
        file: PathBuf,
        /// The unquantized original, to report each quantized tensor's error against.
        #[arg(long, value_name = "ORIGINAL")]
        compare: Option<PathBuf>,
    },
}

/// Quantization schemes of `lowbit quantize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scheme {
    /// Asymmetric 8-bit affine codes with f32 scales and u8 zero points.
    Int8,
}

fn parse_granularity(s: &str) -> Result<lowbit::affine::Granularity, String> {
    s.parse().map_err(|e: lowbit::Error| e.to_string())
}

fn parse_dtype(s: &str) -> Result<lowbit::DType, String> {
    s.parse().map_err(|e: lowbit::Error| e.to_string())
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Demo { size } => demo::run(size as usize),
        Command::Quantize { input, output, scheme: Scheme::Int8, granularity, force } => {
            quantize::run_int8(&input, &output, granularity, force)
        }
        Command::Dequantize { input, output, dtype, force } => dequantize::run(&input, &output, dtype, force),
        Command::Inspect { file, compare } => inspect::run(&file, compare.as_deref()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
