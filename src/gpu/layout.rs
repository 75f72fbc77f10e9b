//! Everything the host and the shaders must agree on, defined once here: the uniform structs (`Chunk`,
//! `Call`), the bindings of the one bind group layout every kernel uses, and the compile-time constants
//! (workgroup and tile sizes). The WGSL declarations of all three are generated from these Rust
//! definitions and prepended to every kernel by the preprocessor ([`super::shader`]); the `.wgsl` files in
//! `shaders/` declare none of them. `tests/gpu_wgsl.rs` parses every variant with naga and checks that the
//! WGSL struct layouts (size, member offsets) equal the Rust ones.

use std::fmt::Write as _;

/// A scalar type that can be a member of a generated WGSL uniform struct.
pub(crate) trait WgslScalar {
    /// The WGSL spelling.
    const WGSL: &'static str;
}
impl WgslScalar for u32 {
    const WGSL: &'static str = "u32";
}
impl WgslScalar for f32 {
    const WGSL: &'static str = "f32";
}

/// Layout of one uniform struct as the host writes it: WGSL name, size in bytes and every member's
/// `(name, byte offset, WGSL type)`. The shaders' declarations are generated from this, so they agree by
/// construction; [`uniform_layouts`] exposes it for the layout test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UniformLayout {
    /// The struct's WGSL name.
    pub name: &'static str,
    /// `size_of` the Rust struct, in bytes.
    pub size: usize,
    /// `(member name, byte offset, WGSL scalar type)` in declaration order.
    pub members: Vec<(&'static str, usize, &'static str)>,
}

impl UniformLayout {
    /// The WGSL `struct` declaration of this layout (scalars only, so WGSL's offsets equal `repr(C)`'s).
    pub fn wgsl(&self) -> String {
        let mut s = format!("struct {} {{\n", self.name);
        for (name, _, ty) in &self.members {
            let _ = writeln!(s, "    {name}: {ty},");
        }
        s.push_str("};\n");
        s
    }
}

/// Declares a `#[repr(C)]` uniform struct of u32/f32 scalars together with its [`UniformLayout`].
macro_rules! uniform_struct {
    ($(#[$m:meta])* $name:ident => $wgsl:literal { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        pub(crate) struct $name {
            $($(#[$fm])* pub(crate) $field: $ty,)*
        }
        // Uniform structs are kept a multiple of 16 bytes (WGSL's uniform struct alignment), so they can also
        // be placed in arrays or at dynamic offsets unchanged.
        const _: () = assert!(std::mem::size_of::<$name>().is_multiple_of(16));
        impl $name {
            pub(crate) fn layout() -> UniformLayout {
                UniformLayout {
                    name: $wgsl,
                    size: std::mem::size_of::<$name>(),
                    members: vec![$((
                        stringify!($field),
                        std::mem::offset_of!($name, $field),
                        <$ty as WgslScalar>::WGSL,
                    )),*],
                }
            }
        }
    };
}

uniform_struct! {
    /// `Chunk`: static parameters of one row chunk of the weight (uploaded once with the weight). All indices
    /// are u32; the host rejects tensors whose element count does not fit.
    ChunkParams => "Chunk" {
        /// K: input features.
        n_in: u32,
        /// N: output features of the whole layer (row stride of y).
        n_out: u32,
        /// First output row (feature) covered by this chunk.
        row0: u32,
        /// Number of output rows in this chunk.
        rows: u32,
        /// Global u32-word index of `codes[0]`.
        word_base: u32,
        /// Global index of the scale entry in `scales[0]` (4-bit: block; DQ: block, a multiple of 4; int8:
        /// parameter entry).
        sblk_base: u32,
        /// int8: word offset of the packed zero points inside `scales`.
        zp_off: u32,
        /// 4-bit: log2(block size).
        log2_bs: u32,
        /// int8 per group: the group size g (inputs per scale / zero point).
        group_size: u32,
        /// int8 per group: groups per row.
        ngroups: u32,
        /// DQ: log2(nested block size).
        nested_log2: u32,
        /// DQ: word offset of nested_absmax inside `lconst` (the map is `lconst[16..272)`).
        nested_off: u32,
        /// DQ: the offset added back after scaling.
        dq_offset: f32,
        /// Word offset of the bias inside `lconst`.
        bias_off: u32,
        /// 1 when the layer has a bias.
        has_bias: u32,
        /// Word offset of the adapter descriptors inside `lconst` (4 words each: rank offset, rank, scaling
        /// bits, offset of B in `lora`).
        ad_off: u32,
        /// Number of attached adapters.
        n_adapters: u32,
        /// Sum of adapter ranks (row stride of `t`).
        r_total: u32,
        /// Padding to 16 bytes.
        _p0: u32,
        /// Padding to 16 bytes.
        _p1: u32,
    }
}

uniform_struct! {
    /// `Call`: parameters of one recorded forward. Never rewritten after creation (see
    /// [`GpuLinear::encode_forward`](super::GpuLinear::encode_forward) for why).
    CallParams => "Call" {
        /// Rows of x.
        m: u32,
        /// u32 words of adapter mask per row in `rowinfo`.
        mask_words: u32,
        /// Words between the masks of consecutive rows: `mask_words` for per-row masks, 0 when every row
        /// uses the same mask (stored once).
        mask_stride: u32,
        /// 1 when at least one row has an adapter.
        use_lora: u32,
    }
}

uniform_struct! {
    /// `Grad`: which adapter one backward gradient dispatch (`dA` / `dB`) works on. One immutable buffer per
    /// adapter of a layer, created on the first backward.
    GradParams => "Grad" {
        /// Adapter id (index into the descriptors at `Chunk::ad_off`).
        adapter: u32,
        /// Padding to 16 bytes.
        _p0: u32,
        /// Padding to 16 bytes.
        _p1: u32,
        /// Padding to 16 bytes.
        _p2: u32,
    }
}

/// Layouts of every uniform struct the kernels read.
pub fn uniform_layouts() -> Vec<UniformLayout> {
    vec![ChunkParams::layout(), CallParams::layout(), GradParams::layout()]
}

/// How a binding is declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BindKind {
    /// `var<storage, read>` of the given WGSL type.
    StorageRead(&'static str),
    /// `var<storage, read_write>` of the given WGSL type.
    StorageReadWrite(&'static str),
    /// `var<uniform>` of the named struct.
    Uniform(&'static str),
}

/// Binding indices of group 0 (the only group).
pub(crate) mod bind {
    /// Packed codes of one chunk (u32 words).
    pub(crate) const CODES: u32 = 0;
    /// Scales of one chunk (f32 bits, DQ codes or int8 scales + zero points).
    pub(crate) const SCALES: u32 = 1;
    /// Per-layer constants (table, DQ map, nested absmax, bias, adapter descriptors).
    pub(crate) const LCONST: u32 = 2;
    /// `x` [m, in].
    pub(crate) const X: u32 = 3;
    /// `y` [m, out].
    pub(crate) const Y: u32 = 4;
    /// LoRA `t` [m, r_total] (written by the shrink kernel, read by the output pass).
    pub(crate) const T: u32 = 5;
    /// All adapters' A then B.
    pub(crate) const LORA: u32 = 6;
    /// Adapter masks per row.
    pub(crate) const ROWINFO: u32 = 7;
    /// `Chunk` uniform.
    pub(crate) const CHUNK: u32 = 8;
    /// `Call` uniform.
    pub(crate) const CALL: u32 = 9;
}

/// Binding indices of the backward's `dx` kernel (decodes the weight; its own bind group layout).
pub(crate) mod bind_dx {
    /// Packed codes of one chunk.
    pub(crate) const CODES: u32 = 0;
    /// Scales of one chunk.
    pub(crate) const SCALES: u32 = 1;
    /// Per-layer constants.
    pub(crate) const LCONST: u32 = 2;
    /// `dy` [m, out].
    pub(crate) const DY: u32 = 3;
    /// `dx` [m, in] (written).
    pub(crate) const DX: u32 = 4;
    /// Backward scratch: `t = x·Aᵀ` [m, r_total] then `u = dy·B` [m, r_total] (read here).
    pub(crate) const T: u32 = 5;
    /// All adapters' A then B.
    pub(crate) const LORA: u32 = 6;
    /// Adapter masks per row.
    pub(crate) const ROWINFO: u32 = 7;
    /// `Chunk` uniform.
    pub(crate) const CHUNK: u32 = 8;
    /// `Call` uniform.
    pub(crate) const CALL: u32 = 9;
}

/// Binding indices of the backward's LoRA kernels (shrink, `u = dy·B`, `dA`, `dB`; no weight bindings).
pub(crate) mod bind_lora {
    /// Per-layer constants.
    pub(crate) const LCONST: u32 = 0;
    /// `x` [m, in].
    pub(crate) const X: u32 = 1;
    /// `dy` [m, out].
    pub(crate) const DY: u32 = 2;
    /// Backward scratch: `t` [m, r_total] then `u` [m, r_total] (written).
    pub(crate) const T: u32 = 3;
    /// All adapters' A then B.
    pub(crate) const LORA: u32 = 4;
    /// Adapter masks per row.
    pub(crate) const ROWINFO: u32 = 5;
    /// ∂L/∂A of one adapter, [rank, in] (accumulated into).
    pub(crate) const DA: u32 = 6;
    /// ∂L/∂B of one adapter, [out, rank] (accumulated into).
    pub(crate) const DB: u32 = 7;
    /// `Chunk` uniform (chunk 0's: the layer-wide fields).
    pub(crate) const CHUNK: u32 = 8;
    /// `Call` uniform.
    pub(crate) const CALL: u32 = 9;
    /// `Grad` uniform.
    pub(crate) const GRAD: u32 = 10;
}

/// The three bind group layouts: the forward's (every forward kernel), the backward `dx` kernel's and the
/// backward LoRA kernels'. Each stays within WebGPU's 8 storage buffers per stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum BindingSet {
    /// [`BINDINGS`].
    Forward,
    /// [`BINDINGS_DX`].
    BackwardDx,
    /// [`BINDINGS_LORA`].
    BackwardLora,
}

impl BindingSet {
    /// Every set, in the order of the context's layouts.
    pub(crate) const ALL: [BindingSet; 3] = [BindingSet::Forward, BindingSet::BackwardDx, BindingSet::BackwardLora];

    /// The set's bindings.
    pub(crate) fn bindings(self) -> &'static [(u32, &'static str, BindKind)] {
        match self {
            BindingSet::Forward => BINDINGS,
            BindingSet::BackwardDx => BINDINGS_DX,
            BindingSet::BackwardLora => BINDINGS_LORA,
        }
    }

    /// Index into [`Self::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Bindings of the backward `dx` kernel: (index, WGSL name, kind).
pub(crate) const BINDINGS_DX: &[(u32, &str, BindKind)] = &[
    (bind_dx::CODES, "codes", BindKind::StorageRead("array<u32>")),
    (bind_dx::SCALES, "scales", BindKind::StorageRead("array<u32>")),
    (bind_dx::LCONST, "lconst", BindKind::StorageRead("array<u32>")),
    (bind_dx::DY, "dy", BindKind::StorageRead("array<f32>")),
    (bind_dx::DX, "dx", BindKind::StorageReadWrite("array<f32>")),
    (bind_dx::T, "t", BindKind::StorageRead("array<f32>")),
    (bind_dx::LORA, "lora", BindKind::StorageRead("array<f32>")),
    (bind_dx::ROWINFO, "rowinfo", BindKind::StorageRead("array<u32>")),
    (bind_dx::CHUNK, "ck", BindKind::Uniform("Chunk")),
    (bind_dx::CALL, "call", BindKind::Uniform("Call")),
];

/// Bindings of the backward LoRA kernels. The names the forward's shrink kernel uses (`lconst`, `x`, `t`,
/// `lora`, `rowinfo`, `ck`, `call`) are the same, so `shrink.wgsl` runs unchanged as the backward's shrink.
pub(crate) const BINDINGS_LORA: &[(u32, &str, BindKind)] = &[
    (bind_lora::LCONST, "lconst", BindKind::StorageRead("array<u32>")),
    (bind_lora::X, "x", BindKind::StorageRead("array<f32>")),
    (bind_lora::DY, "dy", BindKind::StorageRead("array<f32>")),
    (bind_lora::T, "t", BindKind::StorageReadWrite("array<f32>")),
    (bind_lora::LORA, "lora", BindKind::StorageRead("array<f32>")),
    (bind_lora::ROWINFO, "rowinfo", BindKind::StorageRead("array<u32>")),
    (bind_lora::DA, "da", BindKind::StorageReadWrite("array<f32>")),
    (bind_lora::DB, "db", BindKind::StorageReadWrite("array<f32>")),
    (bind_lora::CHUNK, "ck", BindKind::Uniform("Chunk")),
    (bind_lora::CALL, "call", BindKind::Uniform("Call")),
    (bind_lora::GRAD, "gp", BindKind::Uniform("Grad")),
];

/// Every binding of the forward kernels: (index, WGSL name, kind). One bind group layout serves every forward
/// kernel (the shrink kernel ignores the weight bindings), so bind groups do not depend on the kernel variant.
pub(crate) const BINDINGS: &[(u32, &str, BindKind)] = &[
    (bind::CODES, "codes", BindKind::StorageRead("array<u32>")),
    (bind::SCALES, "scales", BindKind::StorageRead("array<u32>")),
    (bind::LCONST, "lconst", BindKind::StorageRead("array<u32>")),
    (bind::X, "x", BindKind::StorageRead("array<f32>")),
    (bind::Y, "y", BindKind::StorageReadWrite("array<f32>")),
    (bind::T, "t", BindKind::StorageReadWrite("array<f32>")),
    (bind::LORA, "lora", BindKind::StorageRead("array<f32>")),
    (bind::ROWINFO, "rowinfo", BindKind::StorageRead("array<u32>")),
    (bind::CHUNK, "ck", BindKind::Uniform("Chunk")),
    (bind::CALL, "call", BindKind::Uniform("Call")),
];

/// The bind group layout entries of `set`.
pub(crate) fn layout_entries(set: BindingSet) -> Vec<wgpu::BindGroupLayoutEntry> {
    set.bindings()
        .iter()
        .map(|&(binding, _, kind)| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match kind {
                    BindKind::StorageRead(_) => wgpu::BufferBindingType::Storage { read_only: true },
                    BindKind::StorageReadWrite(_) => wgpu::BufferBindingType::Storage { read_only: false },
                    BindKind::Uniform(_) => wgpu::BufferBindingType::Uniform,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect()
}

/// Threads per workgroup of the GEMV and shrink kernels.
pub(crate) const WG: u32 = 64;
/// Rows of `x` one GEMV workgroup handles (larger M runs several batches along the z dimension).
pub(crate) const MAXM: u32 = 8;
/// Rows of `x` (and output features) per GEMM workgroup tile.
pub(crate) const GEMM_TILE: u32 = 64;
/// Inputs per GEMM step (the K extent of the workgroup tiles).
pub(crate) const GEMM_BK: u32 = 16;
/// Outputs per GEMM thread along each tile side (each thread computes a THREAD × THREAD block).
pub(crate) const GEMM_THREAD: u32 = 4;
/// GEMM threads along each workgroup side.
pub(crate) const GEMM_WG_SIDE: u32 = GEMM_TILE / GEMM_THREAD;
/// Elements of one GEMM workgroup tile (`BK × TILE`).
pub(crate) const GEMM_TILE_LEN: u32 = GEMM_BK * GEMM_TILE;
/// Tile elements each GEMM thread loads per step.
pub(crate) const GEMM_LOADS: u32 = GEMM_TILE_LEN / (GEMM_WG_SIDE * GEMM_WG_SIDE);
const _: () =
    assert!(GEMM_TILE.is_multiple_of(GEMM_THREAD) && GEMM_TILE_LEN.is_multiple_of(GEMM_WG_SIDE * GEMM_WG_SIDE));
const _: () = assert!(WG.is_power_of_two() && MAXM <= WG);
// gemv.wgsl keeps a batch's row sums in two vec4 registers (`x_rows`, `spill`).
const _: () = assert!(MAXM == 8);

/// The WGSL declarations prepended to every kernel: constants, uniform structs (those `set` binds), bindings.
pub(crate) fn wgsl_prelude(set: BindingSet) -> String {
    let mut s = String::new();
    let consts: [(&str, u32); 10] = [
        ("WG", WG),
        ("MAXM", MAXM),
        ("RED_LEN", WG * MAXM),
        ("GEMM_BM", GEMM_TILE),
        ("GEMM_BN", GEMM_TILE),
        ("GEMM_BK", GEMM_BK),
        ("GEMM_THREAD", GEMM_THREAD),
        ("GEMM_WG_SIDE", GEMM_WG_SIDE),
        ("GEMM_TILE_LEN", GEMM_TILE_LEN),
        ("GEMM_LOADS", GEMM_LOADS),
    ];
    for (name, v) in consts {
        let _ = writeln!(s, "const {name}: u32 = {v}u;");
    }
    let bindings = set.bindings();
    for l in uniform_layouts() {
        if bindings.iter().any(|&(_, _, k)| k == BindKind::Uniform(l.name)) {
            s.push_str(&l.wgsl());
        }
    }
    for &(binding, name, kind) in bindings {
        let (space, ty) = match kind {
            BindKind::StorageRead(t) => ("storage, read", t),
            BindKind::StorageReadWrite(t) => ("storage, read_write", t),
            BindKind::Uniform(t) => ("uniform", t),
        };
        let _ = writeln!(s, "@group(0) @binding({binding}) var<{space}> {name}: {ty};");
    }
    s
}
