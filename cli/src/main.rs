//! `lowbit`: quantize, dequantize and inspect safetensors checkpoints, and demonstrate the kernels.
//!
//! This file holds the command-line definitions (clap derive) and the dispatch; each user command lives in its
//! own module. `demo` and `bench` are thin entry points: their implementation is `lowbit_testkit::demo` and
//! `lowbit_testkit::bench`, whose errors become [`CliError`]s with the same message. Every error is printed
//! as `error: <message>` (control characters made visible by `console::escape`) and exits with status 1;
//! usage errors from clap exit with status 2.

mod adapter;
mod bench_convert;
mod chunked;
mod console;
mod dequantize;
mod dtype_arg;
mod error;
mod finetune;
mod forward;
mod generate;
mod gpu;
mod hf_config;
mod hf_dir;
mod inspect;
mod int8_layout;
mod layer;
mod llm;
mod merge;
mod output;
mod perplexity;
mod progress;
mod quantize;
mod quantized;
mod select;
mod signals;
mod table;

use clap::{CommandFactory, Parser, Subcommand};
use error::CliError;
use gpu::Device;
use lowbit_testkit::bench;
use std::path::PathBuf;
use std::process::ExitCode;

const QUANTIZE_LONG_ABOUT: &str = "\
MODEL is a safetensors file, a Hugging Face model directory (config.json + model.safetensors, or shards +
model.safetensors.index.json) or a GGUF file (llama-family tensors under their Hugging Face names). It is
memory-mapped and never modified.

Which tensors are quantized, for both kinds of output (first rule that applies wins):
  1. tensors that are not floating point (F32, F16, BF16, GGUF float types) or have fewer than 2 dimensions
     (biases, norms) are never quantized;
  2. --skip GLOB: a matching tensor is kept;
  3. --include GLOB: a matching tensor is quantized;
  4. the default rule: the decoder's linear layers, i.e. `*.weight` tensors except embeddings (a name
     containing `embed`, or a `wte` / `wpe` component) and `lm_head`, as transformers + bitsandbytes do.
GLOBs match the full tensor name (`*` any characters, dots included; `?` one character), e.g.
--skip 'model.layers.0.*' --include lm_head.weight; both can be repeated, and one that matches no tensor is an
error. Kept tensors are copied in their dtype; GGUF tensors of quantized ggml types (e.g. a Q8_0 embedding)
are decoded and written as f32, or as --dtype.

Output: with -o FILE.safetensors, one safetensors file. With any other path, a Hugging Face model directory:
model.safetensors, or shards model-00001-of-0000N.safetensors + model.safetensors.index.json when the tensors
exceed --max-shard-size (each shard is written before the next is built); config.json (the input's
configuration, or the one derived from the GGUF metadata, with a quantization_config); the tokenizer files
the input directory has (tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.json,
merges.txt, tokenizer.model, generation_config.json, chat_template.jinja). The directory is built under a
temporary sibling name and renamed into place at the end.

quantization_config: for nf4 / fp4 the bitsandbytes 4-bit fields (quant_method: bitsandbytes, load_in_4bit,
bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype = the weights' source dtype,
bnb_4bit_quant_storage: uint8, llm_int8_skip_modules = the modules kept in floating point, lm_head included),
so transformers + bitsandbytes load the directory with from_pretrained. For int8 a lowbit block
(quant_method: lowbit); transformers cannot load that layout, lowbit reads it.

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

nf4 / fp4 layout (bitsandbytes / QLoRA): each quantized weight NAME is written exactly as bitsandbytes'
Linear4bit state dict stores it:

  NAME                                   U8  [(numel+1)/2, 1]  packed 4-bit codes, first element high nibble
  NAME.absmax                            F32 [nblocks] (U8 [nblocks] with --double-quant)  block scales
  NAME.quant_map                         F32 [16]              the NF4 (or FP4) table
  NAME.nested_absmax                     F32 [ceil(nblocks/256)]  only with --double-quant
  NAME.nested_quant_map                  F32 [256]             only with --double-quant
  NAME.quant_state.bitsandbytes__nf4     U8  [len]             JSON: quant_type, blocksize, dtype, shape, ...

Blocks of --blocksize elements (32, 64, 128, ..., 4096; default 64) run over the flattened weight; the JSON
records the source dtype and shape.

`lowbit dequantize` and `lowbit inspect` read both layouts back.";

const DEQUANTIZE_LONG_ABOUT: &str = "\
Reads a checkpoint written by `lowbit quantize` (int8), any bitsandbytes 4-bit (NF4/FP4) checkpoint, or a
GGUF file: a safetensors file, a model directory (single or sharded) or a .gguf. Writes every quantized
weight back under its own name as floating point, dropping the quantization entries (NAME.scale /
NAME.zero_point; NAME.absmax, NAME.quant_map, NAME.nested_*, NAME.quant_state.*) and copying every other
tensor unchanged. Without --dtype, int8 weights and GGUF tensors of quantized ggml types become f32 and 4-bit
weights take the dtype their quant state records. The input is memory-mapped and never modified.

With -o FILE.safetensors the output is one file; with any other path, a dense Hugging Face model directory
(shards over --max-shard-size, config.json without quantization_config, tokenizer files copied), built under
a temporary name and renamed into place.

--dtype f16 / bf16 never overflows silently: a finite value beyond the dtype's range (|x| > 65504 for f16,
about 3.39e38 for bf16, after rounding) is an error naming the first such element (tensor, index, value).
With --allow-overflow such values keep the IEEE rounding and are written as +inf / -inf (not saturated to the
largest finite value); the summary counts them.";

const INSPECT_LONG_ABOUT: &str = "\
Lists the tensors of a checkpoint: a safetensors file, a Hugging Face model directory (config.json +
model.safetensors, or sharded model-0000N-of-0000M.safetensors + model.safetensors.index.json) or a GGUF file
(tensors under their Hugging Face names). A summary comes first: files, total size of the tensor data,
parameters, average bits per weight over all tensors and over the quantized ones, and with --compare the worst
SQNR and its tensor. Then one row per tensor: name, stored type (safetensors dtype or ggml type), shape (of the
original weight), format (int8 tensor/channel/group:G, nf4/fp4 block:B [nested], ggml TYPE, or plain) and
storage cost in bits per weight (parameters included). A quantized weight's parameter entries are folded into
its row.

With --compare ORIGINAL (any checkpoint form above), every quantized tensor (lowbit int8, bitsandbytes 4-bit,
or a quantized ggml type) is decoded to f32 and compared with the tensor of the same name in ORIGINAL: maximum
and mean absolute error and the signal-to-quantization-noise ratio
SQNR = 10 log10(sum x^2 / sum (x - x_hat)^2) in dB: `inf` means an exact reconstruction, `-inf` an infinite
error, `NaN` a NaN in the values or the error (the maximum error is then NaN too), `-` nothing to measure
(all zero). The summary's worst SQNR counts NaN as the worst.";

const FORWARD_LONG_ABOUT: &str = "\
Loads the linear layer whose weights are stored under PREFIX in CHECKPOINT (a safetensors file, a Hugging Face
model directory, a sharded directory or a GGUF): the quantized weight PREFIX.weight [out, in] (bitsandbytes 4-bit
NF4/FP4 with its quant-state entries, or lowbit int8 with PREFIX.weight.scale / PREFIX.weight.zero_point) and
the optional bias PREFIX.bias. A dense PREFIX.weight (F32/F16/BF16, or a GGUF tensor of any type lowbit
decodes, such as Q4_1 or Q8_0) runs too: decoded to f32, every output accumulated in f64 and rounded to f32
once (CPU only). A layer is named by its module path (model.layers.0.mlp.up_proj), not by its
weight's name. With --adapter, the PEFT LoRA adapter's module for PREFIX (keys
base_model.model.PREFIX.lora_A.weight / lora_B.weight) is attached, with PEFT's scaling (lora_alpha / r, or
/ sqrt(r) with use_rslora, rank_pattern and alpha_pattern honoured); it is an error if the adapter has no
module for PREFIX.

Reads the tensor `x` from INPUT: [M, in], or any rank above 2 ending in `in` ([batch, tokens, in], as a
forward hook captures it; the leading dimensions are flattened into M rows), in F32, F16, BF16 or F64 (rounded
to f32; a value that is not finite or lies outside the f32 range is an error). Computes
y = x*dequant(W)^T + bias [+ s*(x*A^T)*B^T] with the fused kernels (f32 accumulation; the same result as
lowbit::linear::QuantLinear::forward) and writes `y` [M, out] as F32 to OUTPUT ([..., out], with x's leading
dimensions, for a higher-rank x). Use it to check a checkpoint and adapter against another implementation.

With --device gpu the layer is uploaded to the preferred GPU adapter (wgpu: Vulkan, Metal, DX12, GL) and run
by the fused WGSL kernels: the same result up to f32 accumulation order (not bit for bit). It is an error if
there is no adapter. When XDG_RUNTIME_DIR is unset or invalid, it points at a private temporary directory
while lowbit runs, so that drivers probing for a display stay quiet.";

const MERGE_LONG_ABOUT: &str = "\
For every module of the PEFT adapter in DIR that has a layer of the same path in BASE (a safetensors file, a
Hugging Face model directory, a sharded directory or a GGUF), computes W' = dequant(W) + s*B*A in f32 and:

  (default)         requantizes it in the base's format (int8: the same granularity, parameters
                    recalibrated; NF4/FP4: the same block size, double quantization and recorded dtype).
                    OUTPUT has the base's layout; every other tensor and the metadata are copied unchanged.
                    The base must be quantized.
  --dtype f16|bf16|f32
                    writes W' dense in that dtype, without requantization. Every other quantized weight is
                    dequantized to that dtype too, so OUTPUT is one dense checkpoint. Dense layers of the
                    base are merged too.
  --scheme SCHEME   quantizes W' with SCHEME (same syntax as `lowbit quantize --scheme`, e.g. int8:channel).
                    Every other quantized weight not already in SCHEME is requantized to it from its
                    dequantized values. Dense layers of the base are merged too.

Prints, per merged layer, how much of the adapter's change survived: with D = s*B*A and D' = W'_stored -
dequant(W), `kept` = <D', D> / |D|^2 (100% when all of it survived) and |D'-D|/|D|; and the error the final
rounding added (stored W' vs dequant(W) + s*B*A): max abs, RMS and SQNR in dB. A layer where |D'-D| >= |D|
(the rounding erased at least as much as the adapter changed) is marked `!`, and one warning on stderr counts
them and names the ways out (--dtype, --scheme). Lists adapter modules that matched no quantized layer. It is
an error if no module matches. OUTPUT is never an input: the base file, a file of the base directory or of the
adapter directory is refused, even with --force.";

const BENCH_LONG_ABOUT: &str = "\
Builds a synthetic layer (the demo's LLM-like weight quantized to FORMAT, a bias and, with --lora-rank, a LoRA
adapter with alpha = 2r), runs the fused forward y = x*W^T + bias + s*(x*A^T)*B^T on a synthetic x [M, IN]
(2 warm-up runs, then K timed runs) and prints the median time, GFLOP/s (2*M*OUT*IN) and GB/s of packed
weight read (codes + scales per forward / time).

The result is then compared with the f64 reference forward: max |err|, relative L2 error and the largest
ratio of error to the stated bound (f32 accumulation error, the bound tests/linear_paths.rs uses). The
reference is skipped when OUT*IN*M exceeds 2e8. A result outside the bound fails with exit status 1.

Before building anything, bench estimates its work: (2 warm-up + K) forwards of 2*M*OUT*IN FLOPs and the
bytes of weight, x and y at 5 GFLOP/s and 1 GB/s, building the layer at 2e7 weights/s and the reference at
1e8 multiply-adds/s (deliberately slow rates). Past 60 s it refuses with the estimate, unless --yes.

With --all, runs a fixed suite instead (about 6 minutes on 2 cores; --quick: under a minute): quantize and
dequantize (int8 tensor/channel/group:128, NF4, NF4+DQ; 4096x4096), GEMV (M=1) and GEMM (M=8, 64) for NF4,
NF4+DQ and int8 channel at 4096x4096 and 4096x14336 with and without a rank-16 LoRA adapter, and without LoRA
also with int8 activations (kernels gemv-act8, gemm-act8), on the scalar path (small cases only), the best
instruction set on one thread and on all threads; then SmolLM2's small layers (576x576, 1536x576, 576x1536,
NF4+DQ, both activation modes, M=1 and 8, M=1 with LoRA, and +pair: two layers side by side with lowbit::cpu::join)
from a pool worker. It first measures the memory read, write and copy
bandwidth over 256 MiB buffers and the compute peaks (f32 FMA; int8 dot where the CPU has AVX-512 VNNI), one
thread and all threads, and prints one Markdown table: median ms, GB/s = (bytes read + written) / median,
GFLOP/s, GB/s as a percentage of the measured bandwidth in the kernel's dominant direction, and GFLOP/s as a
percentage of the compute peak (int8 for -act8 kernels), at the same thread count, and on all threads the
speedup over the same case on one thread. --json prints the same as JSON records (kernel, format, shape,
batch, path, threads, median_s, gb_s, gflop_s, frac_of_limit, limit, frac_of_compute, speedup_over_1_thread).

With --device gpu the layer runs on the preferred GPU adapter (fused WGSL kernels): the time is the median
kernel time from GPU timestamp queries when the adapter has them, else the median wall time of a whole
forward (x upload and y readback included); the output says which. The check uses the GPU bound of
QuantLinear::error_bound with BoundTarget::Gpu (the CPU bound plus the double-quantization and bias terms). On a CPU adapter (lavapipe,
llvmpipe) the figures say nothing about GPU speed.";

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
    /// and print speed and error; then time the fused QuantLinear forward on it (NF4, NF4+DQ, int8; M = 1
    /// and 8; with and without a rank-16 LoRA adapter) and check it against the f64 reference; then the
    /// same QuantLinear cases on the GPU (at most 1024x1024) when an adapter exists.
    Demo {
        /// Rows and columns of the synthetic matrix (for quick checks).
        #[arg(long, default_value_t = 4096, hide = true, value_parser = clap::value_parser!(u32).range(1..=8192))]
        size: u32,
    },
    /// Quantize the linear-layer weights of a model (safetensors file, model directory or GGUF).
    #[command(long_about = QUANTIZE_LONG_ABOUT)]
    Quantize {
        /// Input model: a safetensors file, a model directory (single or sharded) or a .gguf file.
        #[arg(value_name = "MODEL")]
        input: PathBuf,
        /// Output: a path ending in .safetensors writes one file, any other path a model directory.
        #[arg(short, long, value_name = "OUT")]
        output: PathBuf,
        /// Quantization scheme: `int8` (= `int8:channel`), `int8:tensor`, `int8:group:G`, `nf4` (= `nf4:64`),
        /// `nf4:BS`, `nf4:BS+dq`, `fp4` (= `fp4:64`), `fp4:BS`, `fp4:BS+dq` (BS: 32, 64, ..., 4096). The options
        /// below refine it.
        #[arg(long, value_parser = parse_scheme, value_name = "SCHEME", default_value = "int8")]
        scheme: lowbit::Scheme,
        /// int8: which values share a scale and zero point: `tensor`, `channel` (one per row, the default) or
        /// `group:G` (G consecutive values along a row).
        #[arg(long, value_parser = parse_granularity)]
        granularity: Option<lowbit::affine::Granularity>,
        /// nf4 / fp4: elements per block (32, 64, 128, 256, 512, 1024, 2048 or 4096) [default: 64].
        #[arg(long, value_parser = parse_blocksize)]
        blocksize: Option<usize>,
        /// nf4 / fp4: double-quantize the block scales (8-bit codes + one f32 per 256 blocks, as QLoRA does).
        #[arg(long)]
        double_quant: bool,
        /// Keep the tensors whose full name matches GLOB (`*`, `?`); repeatable; wins over --include.
        #[arg(long, value_name = "GLOB", value_parser = parse_glob)]
        skip: Vec<select::Glob>,
        /// Quantize the floating >= 2-D tensors matching GLOB even if the default rule keeps them (embeddings,
        /// lm_head); repeatable.
        #[arg(long, value_name = "GLOB", value_parser = parse_glob)]
        include: Vec<select::Glob>,
        /// Element type for kept GGUF tensors of quantized ggml types (e.g. a Q8_0 embedding) [default: f32].
        #[arg(long, value_enum)]
        dtype: Option<dtype_arg::DtypeArg>,
        /// Model directory output: largest shard, in tensor bytes (e.g. 500MB, 2GB, 1GiB, or bytes).
        #[arg(long, value_name = "SIZE", value_parser = hf_dir::parse_size, default_value = "5GB")]
        max_shard_size: u64,
        /// Memory for conversion buffers (e.g. 64MiB, 1GB): a large tensor is converted in chunks of a quarter
        /// of it, so peak memory stays near this budget whatever the model's size.
        #[arg(long, value_name = "SIZE", value_parser = hf_dir::parse_size, default_value = "256MiB")]
        memory_budget: u64,
        /// Replace OUT if it exists (a directory is replaced only after the new one is complete).
        #[arg(long)]
        force: bool,
    },
    /// Turn a quantized model (or a GGUF) back into floating point.
    #[command(long_about = DEQUANTIZE_LONG_ABOUT)]
    Dequantize {
        /// Input model: a safetensors file, a model directory (single or sharded) or a .gguf file.
        #[arg(value_name = "MODEL")]
        input: PathBuf,
        /// Output: a path ending in .safetensors writes one file, any other path a model directory.
        #[arg(short, long, value_name = "OUT")]
        output: PathBuf,
        /// Element type of the dequantized weights [default: f32 for int8 and GGUF, the recorded dtype for
        /// 4-bit]. A finite value outside the f16 / bf16 range is an error naming it (see --allow-overflow).
        #[arg(long, value_enum)]
        dtype: Option<dtype_arg::DtypeArg>,
        /// With --dtype f16 / bf16: write values beyond the dtype's range as ±inf (IEEE round-to-nearest, no
        /// saturation) instead of failing; the summary counts them.
        #[arg(long)]
        allow_overflow: bool,
        /// Model directory output: largest shard, in tensor bytes (e.g. 500MB, 2GB, 1GiB, or bytes).
        #[arg(long, value_name = "SIZE", value_parser = hf_dir::parse_size, default_value = "5GB")]
        max_shard_size: u64,
        /// Memory for conversion buffers (e.g. 64MiB, 1GB): a large tensor is converted in chunks of a quarter
        /// of it, so peak memory stays near this budget whatever the model's size.
        #[arg(long, value_name = "SIZE", value_parser = hf_dir::parse_size, default_value = "256MiB")]
        memory_budget: u64,
        /// Replace OUT if it exists (a directory is replaced only after the new one is complete).
        #[arg(long)]
        force: bool,
    },
    /// List the tensors of a checkpoint (safetensors file, model directory or GGUF) with a summary; optionally
    /// measure the error vs an original.
    #[command(long_about = INSPECT_LONG_ABOUT)]
    Inspect {
        /// The checkpoint to list: a safetensors file, a model directory (single or sharded) or a .gguf.
        file: PathBuf,
        /// The unquantized original (any checkpoint form), to report each quantized tensor's error against.
        #[arg(long, value_name = "ORIGINAL")]
        compare: Option<PathBuf>,
    },
    /// Run one linear layer of a quantized checkpoint (optionally with a PEFT LoRA adapter) on the tensor `x`
    /// of an input file and write `y`.
    #[command(long_about = FORWARD_LONG_ABOUT)]
    Forward {
        /// Checkpoint (bitsandbytes 4-bit, lowbit int8 or dense): a safetensors file, a model directory or a .gguf.
        checkpoint: PathBuf,
        /// Module path of the layer, e.g. model.layers.0.mlp.up_proj (weights PREFIX.weight, PREFIX.bias).
        #[arg(long, value_name = "PREFIX")]
        layer: String,
        /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to apply.
        #[arg(long, value_name = "DIR")]
        adapter: Option<PathBuf>,
        /// safetensors file holding the input tensor `x` [..., in] (rank >= 2; F32, F16, BF16 or F64).
        #[arg(long, value_name = "X.safetensors")]
        input: PathBuf,
        /// Output safetensors file; receives `y` [..., out] as F32.
        #[arg(short, long, value_name = "Y.safetensors")]
        output: PathBuf,
        /// Replace OUTPUT if it exists.
        #[arg(long)]
        force: bool,
        /// Run the layer on the CPU or on the preferred GPU adapter (fused WGSL kernels; f32 accumulation).
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
    },
    /// Merge a PEFT LoRA adapter into the layers of a checkpoint: requantized in its format, dense (--dtype)
    /// or in another scheme (--scheme); reports how much of the adapter survived.
    #[command(long_about = MERGE_LONG_ABOUT)]
    Merge {
        /// Base checkpoint: a safetensors file, a model directory (single or sharded) or a .gguf.
        base: PathBuf,
        /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long, value_name = "DIR")]
        adapter: PathBuf,
        /// Output safetensors file (in the base's format unless --dtype or --scheme).
        #[arg(short, long)]
        output: PathBuf,
        /// Write the merged weights dense in this dtype (f16, bf16 or f32), without requantization; every
        /// other quantized weight is dequantized to it.
        #[arg(long, value_enum, conflicts_with = "scheme")]
        dtype: Option<dtype_arg::DtypeArg>,
        /// Quantize the merged weights with this scheme instead of the base's (e.g. `int8:channel`, `nf4:64+dq`;
        /// the syntax of `quantize --scheme`); every other quantized weight not in it is requantized.
        #[arg(long, value_parser = parse_scheme, value_name = "SCHEME")]
        scheme: Option<lowbit::Scheme>,
        /// Replace OUTPUT if it exists (never an input).
        #[arg(long)]
        force: bool,
    },
    /// Time the fused QuantLinear forward (dequantize-matmul [+ LoRA]) on a synthetic layer and check it
    /// against the f64 reference; or, with --all, every kernel on every path against the memory limits.
    #[command(long_about = BENCH_LONG_ABOUT)]
    Bench {
        /// Measure whole-checkpoint conversion instead: `quantize` (NF4+DQ, int8) and `dequantize` of a
        /// synthetic f32 checkpoint of --size bytes, in GB/s next to the memory and file-write bandwidth of
        /// the same run.
        #[arg(long, conflicts_with_all = ["all", "format", "shape", "batch", "lora_rank", "threads", "device"])]
        convert: bool,
        /// With --convert: size of the synthetic checkpoint (e.g. 1GiB, 4GB).
        #[arg(long, value_name = "SIZE", value_parser = hf_dir::parse_size, default_value = "1GiB", requires = "convert")]
        size: u64,
        /// With --convert: directory for the scratch files [default: the system's temporary directory].
        #[arg(long, value_name = "DIR", requires = "convert")]
        dir: Option<PathBuf>,
        /// Run the fixed suite (quantize, dequantize, GEMV, GEMM; every format and path) and print one
        /// Markdown table with each figure as a fraction of the memory bandwidth measured in the same run.
        #[arg(long, conflicts_with_all = ["format", "shape", "batch", "lora_rank", "threads", "iters", "device"])]
        all: bool,
        /// With --all: print JSON records instead of the table.
        #[arg(long, conflicts_with_all = ["format", "shape"])]
        json: bool,
        /// With --all: the reduced suite (4096x4096 only, M = 1 and 8, no scalar path, shorter timing).
        #[arg(long, conflicts_with_all = ["format", "shape"])]
        quick: bool,
        /// Weight scheme: `nf4:64`, `nf4:64+dq` (or `nf4-dq`), `fp4:64`, `int8:channel` (or `int8`),
        /// `int8:tensor`, `int8:group:G`, ...
        #[arg(long, value_parser = parse_scheme, value_name = "SCHEME", required_unless_present_any = ["all", "convert"])]
        format: Option<lowbit::Scheme>,
        /// Weight shape `OUTxIN`, e.g. 4096x4096 or 11008x4096.
        #[arg(long, value_parser = parse_shape, value_name = "OUTxIN", required_unless_present_any = ["all", "convert"])]
        shape: Option<(usize, usize)>,
        /// Rows of the input x (1 = decode, hundreds = prefill).
        #[arg(long, value_name = "M", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        batch: u32,
        /// Attach a LoRA adapter of this rank.
        #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..=4096))]
        lora_rank: Option<u32>,
        /// Run in a pool of N threads [default: one per hardware thread].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
        threads: Option<u32>,
        /// Timed iterations (the median is reported) [default: 20, or 3 with --convert].
        #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=100_000))]
        iters: Option<u32>,
        /// Run on the CPU or on the preferred GPU adapter (kernel time from GPU timestamp queries where the
        /// adapter has them, else wall time per forward).
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// Run even if the estimated work (printed when refused) exceeds about 60 s at conservative rates.
        #[arg(long, conflicts_with = "all")]
        yes: bool,
    },
    /// Generate text with a Llama-family model (SmolLM2, Llama, Qwen2) on lowbit's kernels: the prompt's
    /// tokens run as one batch (prefill), then one token per step with a KV cache; the text is streamed to
    /// stdout, then the prefill and decode speeds.
    Generate {
        #[command(flatten)]
        model: llm::ModelArgs,
        /// The prompt text.
        #[arg(long, value_name = "TEXT", conflicts_with = "tokens", required_unless_present = "tokens")]
        prompt: Option<String>,
        /// The prompt as token ids, e.g. 504,3575,282,4649,314.
        #[arg(long, value_name = "ID,ID,...", value_delimiter = ',', num_args = 1..)]
        tokens: Option<Vec<u32>>,
        /// New tokens to generate at most (generation also stops at an end-of-sequence token).
        #[arg(long, value_name = "N", default_value_t = 128)]
        max_tokens: usize,
        /// Sampling temperature; 0 = greedy.
        #[arg(long, value_name = "T", default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling: keep the most likely tokens up to this total probability.
        #[arg(long, value_name = "P", default_value_t = 1.0)]
        top_p: f32,
        /// Seed of the sampler.
        #[arg(long, value_name = "S", default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt in the ChatML chat template (a user turn, then the assistant's).
        #[arg(long)]
        chat: bool,
        /// Write the logits of every prompt position (before any generated token) as safetensors, one f32
        /// tensor `logits` [T_prompt, vocab]; with --max-tokens 0 a pure forward.
        #[arg(long, value_name = "FILE")]
        logits_out: Option<PathBuf>,
        /// Write the token ids as JSON, `{"prompt": [ids], "generated": [ids]}` (an end-of-sequence token that
        /// ended generation included), for comparing runs (the browser page's, another device's).
        #[arg(long, value_name = "FILE")]
        ids_out: Option<PathBuf>,
        /// Replace the --logits-out / --ids-out file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// QLoRA fine-tuning on the CPU: trains LoRA adapters on a frozen model (quantized on load with --scheme,
    /// e.g. `--scheme nf4 --double-quant`) with the fused backward through the quantized layers, AdamW (or
    /// SGD) and LoRA+; prints `step N loss X` per step (the batch's mean next-token loss before that step's
    /// update, then the gradient norm and tokens/s) and writes a PEFT adapter directory that PEFT and
    /// `lowbit generate --adapter` load.
    Finetune {
        #[command(flatten)]
        model: llm::ModelArgs,
        /// Training text (UTF-8), tokenized without special tokens and cut into windows of --ctx tokens.
        #[arg(long, value_name = "FILE", conflicts_with = "tokens", required_unless_present = "tokens")]
        text: Option<PathBuf>,
        /// Training data as token ids, e.g. 504,3575,282,4649,314.
        #[arg(long, value_name = "ID,ID,...", value_delimiter = ',', num_args = 1..)]
        tokens: Option<Vec<u32>>,
        /// Where to write the trained adapter (adapter_config.json + adapter_model.safetensors).
        #[arg(long, value_name = "DIR")]
        adapter_out: PathBuf,
        /// Double-quantize the block scales of the 4-bit --scheme (QLoRA's NF4 + double quantization).
        #[arg(long)]
        double_quant: bool,
        /// Modules to adapt (new adapter; default q_proj,v_proj).
        #[arg(long, value_name = "NAME,...", value_delimiter = ',', num_args = 1..)]
        targets: Option<Vec<String>>,
        /// LoRA rank of a new adapter (default 8).
        #[arg(long, value_name = "R")]
        rank: Option<usize>,
        /// lora_alpha of a new adapter (default 16); the scaling is alpha / r (alpha / √r with --use-rslora).
        #[arg(long, value_name = "A")]
        alpha: Option<f32>,
        /// rsLoRA scaling alpha / √r for a new adapter.
        #[arg(long)]
        use_rslora: bool,
        /// Learning rate of A (and of B times --lora-plus-ratio).
        #[arg(long, value_name = "LR", default_value_t = 2e-4)]
        lr: f64,
        /// LoRA+: B's learning rate is this times --lr (1 = plain LoRA; the LoRA+ paper suggests 16).
        #[arg(long, value_name = "X", default_value_t = 1.0)]
        lora_plus_ratio: f64,
        /// adamw (bias-corrected, decoupled weight decay), adamw8bit (bitsandbytes' blockwise 8-bit states) or
        /// sgd (θ ← θ − lr·g).
        #[arg(long, value_name = "NAME", value_parser = parse_optimizer, default_value = "adamw")]
        optimizer: lowbit::optim::OptimizerKind,
        /// AdamW's decoupled weight decay.
        #[arg(long, value_name = "WD", default_value_t = 0.0)]
        weight_decay: f64,
        /// Clip the global gradient norm to this (default: no clipping).
        #[arg(long, value_name = "G")]
        max_grad_norm: Option<f64>,
        /// Optimizer steps.
        #[arg(long, value_name = "N", default_value_t = 50)]
        steps: usize,
        /// Tokens per training window.
        #[arg(long, value_name = "T", default_value_t = 128)]
        ctx: usize,
        /// Windows per step (their gradients accumulate before one update).
        #[arg(long, value_name = "B", default_value_t = 1)]
        batch: usize,
        /// Seed of a new adapter's initialisation.
        #[arg(long, value_name = "S", default_value_t = 0)]
        seed: u64,
        /// Replace --adapter-out if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Perplexity of a Llama-family model over a text file, in non-overlapping windows of --ctx tokens (the
    /// first token of each window is not scored); prints `perplexity: X` and the tokens/s.
    Perplexity {
        #[command(flatten)]
        model: llm::ModelArgs,
        /// The text file (UTF-8).
        #[arg(long, value_name = "FILE")]
        text: PathBuf,
        /// Window length in tokens.
        #[arg(long, value_name = "N", default_value_t = 512)]
        ctx: usize,
    },
}

/// Parses a scheme (`lowbit::Scheme` text, e.g. `nf4:64+dq`, `int8:group:128`, `fp4:64`); `nf4-dq` is kept as
/// the older spelling of `nf4:64+dq`.
pub(crate) fn parse_scheme(s: &str) -> Result<lowbit::Scheme, String> {
    let s = if s == "nf4-dq" { "nf4:64+dq" } else { s };
    s.parse().map_err(|e: lowbit::Error| e.to_string())
}

/// Parses an optimizer name (`adamw`, `adamw8bit`, `sgd`).
fn parse_optimizer(s: &str) -> Result<lowbit::optim::OptimizerKind, String> {
    lowbit::optim::OptimizerKind::parse(s).map_err(|e| e.to_string())
}

/// Parses `OUTxIN` (both ≥ 1).
fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("{s:?} is not a shape OUTxIN (e.g. 4096x4096)");
    let (o, i) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let o: usize = o.trim().parse().map_err(|_| bad())?;
    let i: usize = i.trim().parse().map_err(|_| bad())?;
    if o == 0 || i == 0 {
        return Err(format!("{s:?}: both dimensions must be at least 1"));
    }
    Ok((o, i))
}

fn parse_granularity(s: &str) -> Result<lowbit::affine::Granularity, String> {
    s.parse().map_err(|e: lowbit::Error| e.to_string())
}

fn parse_blocksize(s: &str) -> Result<usize, String> {
    let b: usize = s.parse().map_err(|_| format!("{s:?} is not a block size"))?;
    lowbit::nf4::check_blocksize(b).map_err(|e| e.to_string())?;
    Ok(b)
}

/// Combines `--scheme` with the refining options, rejecting ones that belong to the other family (a usage
/// error, exit 2).
fn quantize_scheme(
    scheme: lowbit::Scheme,
    granularity: Option<lowbit::affine::Granularity>,
    blocksize: Option<usize>,
    double_quant: bool,
) -> lowbit::Scheme {
    let conflict = |arg: &str, scheme: &str| -> ! {
        let mut cli = Cli::command();
        cli.build(); // gives the subcommand its full name for the usage line
        let cmd = cli.find_subcommand_mut("quantize").cloned().unwrap_or(cli);
        cmd.clone()
            .error(clap::error::ErrorKind::ArgumentConflict, format!("{arg} does not apply to --scheme {scheme}"))
            .exit()
    };
    match scheme {
        lowbit::Scheme::Int8(g) => {
            if blocksize.is_some() {
                conflict("--blocksize", "int8");
            }
            if double_quant {
                conflict("--double-quant", "int8");
            }
            lowbit::Scheme::Int8(granularity.unwrap_or(g))
        }
        lowbit::Scheme::FourBit { format, blocksize: bs, double_quant: dq } => {
            if granularity.is_some() {
                conflict("--granularity", format.name());
            }
            lowbit::Scheme::FourBit { format, blocksize: blocksize.unwrap_or(bs), double_quant: dq || double_quant }
        }
    }
}

fn parse_glob(s: &str) -> Result<select::Glob, String> {
    select::Glob::new(s)
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Demo { size } => Ok(lowbit_testkit::demo::run(size as usize)?),
        Command::Quantize {
            input,
            output,
            scheme,
            granularity,
            blocksize,
            double_quant,
            skip,
            include,
            dtype,
            max_shard_size,
            memory_budget,
            force,
        } => {
            let scheme = quantize_scheme(scheme, granularity, blocksize, double_quant);
            quantize::run(quantize::Quantize {
                input: &input,
                output: &output,
                scheme,
                selection: select::Selection { skip, include },
                dtype: dtype.map(Into::into),
                max_shard_size,
                force,
                memory_budget,
            })
        }
        Command::Dequantize { input, output, dtype, allow_overflow, max_shard_size, memory_budget, force } => {
            dequantize::run(dequantize::Dequantize {
                input: &input,
                output: &output,
                dtype: dtype.map(Into::into),
                max_shard_size,
                force,
                memory_budget,
                allow_overflow,
            })
        }
        Command::Generate {
            model,
            prompt,
            tokens,
            max_tokens,
            temperature,
            top_p,
            seed,
            chat,
            logits_out,
            ids_out,
            force,
        } => generate::run(generate::Generate {
            model: &model,
            prompt: prompt.as_deref(),
            tokens: tokens.as_deref(),
            max_tokens,
            sampling: lowbit_llm::SamplingOptions { temperature, top_p, seed },
            chat,
            logits_out: logits_out.as_deref(),
            ids_out: ids_out.as_deref(),
            force,
        }),
        Command::Finetune {
            model,
            text,
            tokens,
            adapter_out,
            double_quant,
            targets,
            rank,
            alpha,
            use_rslora,
            lr,
            lora_plus_ratio,
            optimizer,
            weight_decay,
            max_grad_norm,
            steps,
            ctx,
            batch,
            seed,
            force,
        } => finetune::run(finetune::Finetune {
            model: &model,
            text: text.as_deref(),
            tokens: tokens.as_deref(),
            adapter_out: &adapter_out,
            double_quant,
            targets: targets.as_deref(),
            rank,
            alpha,
            use_rslora,
            lr,
            lora_plus_ratio,
            optimizer,
            weight_decay,
            max_grad_norm,
            steps,
            ctx,
            batch,
            seed,
            force,
        }),
        Command::Perplexity { model, text, ctx } => {
            perplexity::run(perplexity::Perplexity { model: &model, text: &text, ctx })
        }
        Command::Inspect { file, compare } => inspect::run(&file, compare.as_deref()),
        Command::Forward { checkpoint, layer, adapter, input, output, force, device } => {
            forward::run(forward::Forward {
                checkpoint: &checkpoint,
                layer: &layer,
                adapter: adapter.as_deref(),
                input: &input,
                output: &output,
                force,
                device,
            })
        }
        Command::Merge { base, adapter, output, dtype, scheme, force } => merge::run(merge::Merge {
            base: &base,
            adapter: &adapter,
            output: &output,
            force,
            target: match (dtype, scheme) {
                (Some(d), _) => merge::Target::Dense(d.into()),
                (None, Some(s)) => merge::Target::Scheme(s),
                (None, None) => merge::Target::Same,
            },
        }),
        Command::Bench { all: true, json, quick, .. } => Ok(bench::all::run(bench::all::Suite { json, quick })?),
        Command::Bench { convert: true, size, dir, iters, .. } => {
            bench_convert::run(bench_convert::ConvertBench { size, iters: iters.unwrap_or(3) as usize, dir })
        }
        Command::Bench { format, shape, batch, lora_rank, threads, iters, device, yes, .. } => {
            let (Some(format), Some((out, inp))) = (format, shape) else {
                return Err(CliError::new("bench needs --format and --shape, or --all"));
            };
            Ok(bench::run(bench::Bench {
                format,
                out,
                inp,
                batch: batch as usize,
                lora_rank: lora_rank.map(|r| r as usize),
                threads: threads.map(|t| t as usize),
                iters: iters.unwrap_or(20) as usize,
                device: device.into(),
                yes,
            })?)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A process that runs layers back to back: keep the second thread awake between splits (README §Performance).
    lowbit::cpu::set_thread_linger(std::time::Duration::from_micros(300));
    let uses_gpu = match &cli.command {
        Command::Demo { .. } => true,
        Command::Forward { device, .. } | Command::Bench { device, .. } => *device == Device::Gpu,
        Command::Generate { model, .. } | Command::Perplexity { model, .. } | Command::Finetune { model, .. } => {
            model.device == Device::Gpu
        }
        _ => false,
    };
    let _runtime_dir = gpu::RuntimeDir::prepare(uses_gpu); // before any thread starts
    signals::install(); // SIGINT/SIGTERM delete lowbit's temporaries, exit 130/143; SIGBUS (truncated input) exits 1
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Names and paths in the message are made visible and inert (console::escape).
            eprintln!("error: {}", console::escape_lines(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
