//! The `config.json` of an output model directory: the input's configuration with the right
//! `quantization_config` (bitsandbytes 4-bit fields for NF4/FP4, a lowbit block for int8) or without one
//! (dense output).

use lowbit::nf4::FourBitFormat;
use lowbit::{DType, Scheme};
use serde_json::{json, Map, Value};

/// The bitsandbytes 4-bit `quantization_config` transformers' `BitsAndBytesConfig` reads (the fields its
/// `to_dict` writes). `skip_modules` lists the module paths kept in floating point: transformers replaces every
/// other `nn.Linear` with a 4-bit layer, and since an explicit list disables its own default (the output
/// head), `lm_head` must be on it unless it was quantized.
pub fn bnb_4bit(format: FourBitFormat, double_quant: bool, compute: DType, skip_modules: &[String]) -> Value {
    json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "load_in_8bit": false,
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_quant_type": format.name(),
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute.torch_name(),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_enable_fp32_cpu_offload": false,
    })
}

/// lowbit's own block for the int8 layout (`docs/formats.md` §6). transformers has no loader for it: its
/// `from_pretrained` refuses the unknown `quant_method`; lowbit's `inspect`, `forward` and `dequantize` read it.
pub fn lowbit_int8(scheme: Scheme, kept_modules: &[String]) -> Value {
    json!({
        "quant_method": "lowbit",
        "scheme": scheme.to_string(),
        "layout": "lowbit int8 (docs/formats.md §6): NAME U8 codes, NAME.scale F32, NAME.zero_point U8; \
                   safetensors metadata lowbit.scheme, lowbit.granularity, lowbit.dtype.NAME",
        "modules_not_quantized": kept_modules,
        "note": "transformers cannot load this layout; use lowbit (inspect, forward, dequantize)",
    })
}

/// The input configuration with `quantization_config` replaced by `quantization` (or removed when `None`).
/// An input without a configuration (a bare safetensors file) gives `None`: there is no model type to write.
pub fn with_quantization(input: Option<&Value>, quantization: Option<Value>) -> Option<Value> {
    let mut config: Map<String, Value> = input?.as_object()?.clone();
    config.remove("quantization_config");
    if let Some(q) = quantization {
        config.insert("quantization_config".to_string(), q);
    }
    Some(Value::Object(config))
}

/// The module paths (`P` of `P.weight`) of `kept` weights, plus `lm_head` unless it was quantized, sorted.
pub fn skip_modules<'a>(kept: impl IntoIterator<Item = &'a str>, lm_head_quantized: bool) -> Vec<String> {
    let mut modules: Vec<String> =
        kept.into_iter().filter_map(|n| n.strip_suffix(".weight")).map(str::to_string).collect();
    if !lm_head_quantized && !modules.iter().any(|m| m == "lm_head") {
        modules.push("lm_head".to_string());
    }
    modules.sort();
    modules.dedup();
    modules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_config_replaces_the_inputs() {
        let input = json!({"model_type": "llama", "quantization_config": {"quant_method": "gptq"}});
        let q = bnb_4bit(FourBitFormat::Nf4, true, DType::BF16, &skip_modules(["model.embed_tokens.weight"], false));
        let out = with_quantization(Some(&input), Some(q)).unwrap();
        assert_eq!(out["model_type"], "llama");
        let q = &out["quantization_config"];
        assert_eq!(q["quant_method"], "bitsandbytes");
        assert_eq!(q["bnb_4bit_quant_type"], "nf4");
        assert_eq!(q["bnb_4bit_compute_dtype"], "bfloat16");
        assert_eq!(q["llm_int8_skip_modules"], json!(["lm_head", "model.embed_tokens"]));
        let dense = with_quantization(Some(&input), None).unwrap();
        assert!(dense.get("quantization_config").is_none());
        assert!(with_quantization(None, None).is_none());
    }
}
