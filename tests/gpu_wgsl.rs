//! Every WGSL kernel variant lowbit can request, preprocessed and validated with naga (the WGSL compiler wgpu
//! itself uses), without a GPU adapter: a shader error is a test failure here, not a runtime surprise on
//! some user's device. Also checks that the uniform structs the shaders see have exactly the Rust layout,
//! and that the `.wgsl` files do not redeclare what the host generates.
#![cfg(all(feature = "gpu", not(target_arch = "wasm32")))]

use lowbit::gpu::wgpu::naga;
use lowbit::gpu::{uniform_layouts, wgpu, KernelKey, KernelOp};
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn parse(key: &KernelKey) -> (String, naga::Module) {
    let src = key.source().unwrap_or_else(|e| panic!("{}: preprocess: {e}", key.name()));
    match naga::front::wgsl::parse_str(&src) {
        Ok(m) => (src, m),
        Err(e) => panic!("{}: WGSL parse error:\n{}", key.name(), e.emit_to_string(&src)),
    }
}

/// The naga capabilities matching a set of wgpu features (as wgpu-core derives them).
fn caps(features: wgpu::Features) -> Capabilities {
    let mut c = Capabilities::empty();
    if features.contains(wgpu::Features::SHADER_F16) {
        c |= Capabilities::SHADER_FLOAT16;
    }
    if features.contains(wgpu::Features::SUBGROUP) {
        c |= Capabilities::SUBGROUP;
    }
    c
}

fn validate(module: &naga::Module, caps: Capabilities) -> Result<naga::valid::ModuleInfo, String> {
    Validator::new(ValidationFlags::all(), caps).validate(module).map_err(|e| format!("{e:?}"))
}

/// Every forward and backward variant.
fn every_key() -> Vec<KernelKey> {
    let mut v = KernelKey::all();
    v.extend(KernelKey::all_backward());
    v
}

#[test]
fn every_variant_parses_and_validates() {
    let all = every_key();
    // Every op × scheme family × optional feature the code can produce, each once; the backward's dx per
    // scheme family and its four LoRA kernels.
    assert_eq!(KernelKey::all().len(), 1 + 2 * 2 * KernelKey::SCHEME_FAMILIES.len());
    assert_eq!(KernelKey::all_backward().len(), KernelKey::SCHEME_FAMILIES.len() + 4);
    for (i, a) in all.iter().enumerate() {
        assert!(all[i + 1..].iter().all(|b| b != a), "{} listed twice", a.name());
        assert!(all[i + 1..].iter().all(|b| b.name() != a.name()), "two variants named {}", a.name());
    }
    for op in [KernelOp::Gemv, KernelOp::Gemm, KernelOp::BackwardDx] {
        for s in KernelKey::SCHEME_FAMILIES {
            assert!(all.iter().any(|k| k.op == op && k.scheme == s), "{op:?} {s} missing");
        }
    }
    for key in &all {
        let (_, module) = parse(key);
        let need = key.required_features();
        validate(&module, caps(need)).unwrap_or_else(|e| panic!("{}: validation with {need:?}: {e}", key.name()));
        assert_eq!(module.entry_points.len(), 1, "{}", key.name());
        let ep = &module.entry_points[0];
        assert_eq!((ep.name.as_str(), ep.stage), ("main", naga::ShaderStage::Compute), "{}", key.name());
        // The optional feature is really needed: without it the variant must not validate. (So a device
        // lacking the feature is never handed such a shader by mistake, and required_features() is honest.)
        if !need.is_empty() {
            assert!(
                validate(&module, Capabilities::empty()).is_err(),
                "{} validates without {need:?}: required_features() claims too much",
                key.name()
            );
        }
    }
}

#[test]
fn uniform_structs_have_the_rust_layout() {
    for key in every_key() {
        let (_, module) = parse(&key);
        // `Chunk` and `Call` in every kernel, `Grad` in the backward's LoRA kernels (the prelude declares only
        // the structs a kernel's bindings use).
        let grad = matches!(
            key.op,
            KernelOp::BackwardShrink | KernelOp::BackwardU | KernelOp::BackwardDa | KernelOp::BackwardDb
        );
        for layout in uniform_layouts().into_iter().filter(|l| l.name != "Grad" || grad) {
            let (ty, members, span) = module
                .types
                .iter()
                .find_map(|(h, t)| match &t.inner {
                    naga::TypeInner::Struct { members, span } if t.name.as_deref() == Some(layout.name) => {
                        Some((h, members, *span))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{}: no struct {}", key.name(), layout.name));
            assert_eq!(span as usize, layout.size, "{}: size of {}", key.name(), layout.name);
            let got: Vec<(String, usize)> =
                members.iter().map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize)).collect();
            let want: Vec<(String, usize)> = layout.members.iter().map(|(n, o, _)| (n.to_string(), *o)).collect();
            assert_eq!(got, want, "{}: members of {}", key.name(), layout.name);
            // It is bound as a uniform.
            let bound =
                module.global_variables.iter().any(|(_, g)| g.ty == ty && g.space == naga::AddressSpace::Uniform);
            assert!(bound, "{}: {} is not bound as a uniform", key.name(), layout.name);
        }
    }
}

#[test]
fn shader_files_do_not_redeclare_generated_items() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "wgsl") {
            continue;
        }
        n += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        for generated in
            ["struct Chunk", "struct Call", "struct Grad", "@binding(", "const WG", "const MAXM", "const GEMM_"]
        {
            assert!(!code.contains(generated), "{}: declares `{generated}`, which the host generates", path.display());
        }
    }
    assert_eq!(n, 6, "expected common, gemv, gemm, shrink, backward_dx and lora_grads in {}", dir.display());
    // No preprocessor directive survives into a variant.
    for key in every_key() {
        let (src, _) = parse(&key);
        assert!(!src.lines().any(|l| l.trim_start().starts_with('#')), "{}: leftover directive", key.name());
    }
}

#[test]
fn keys_of_one_kernel_family_are_one_pipeline() {
    use lowbit::Scheme;
    let key = |scheme: Scheme| KernelKey { op: KernelOp::Gemv, scheme, subgroups: false, f16: false };
    // Format, block size and group size are data: the same kernel.
    assert_eq!(key("nf4:64".parse().unwrap()), key("fp4:128".parse().unwrap()));
    assert_eq!(key("int8:group:32".parse().unwrap()), key("int8:group:128".parse().unwrap()));
    // Double quantization and granularity are code: different kernels, different names.
    assert_ne!(key("nf4:64".parse().unwrap()), key("nf4:64+dq".parse().unwrap()));
    assert_ne!(key("int8:tensor".parse().unwrap()), key("int8:channel".parse().unwrap()));
    assert_eq!(key("nf4:64+dq".parse().unwrap()).name(), "gemv-4bit-dq");
}

/// An engine shares layers and the context across threads (recording is `&self`).
#[test]
fn gpu_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<lowbit::gpu::GpuLinear>();
    send_sync::<lowbit::gpu::GpuContext>();
}
