//! The weight of a quantized linear layer and a borrowed view of a whole layer (weight, bias, adapters), the
//! shape the reference and the CPU kernels read. `QuantLinear` (the API) hands out these views; the layers
//! below it never name it.

use super::affine::AffineTensor;
use super::four_bit::FourBitTensor;
use super::lora::LoraAdapter;
use super::scheme::Scheme;

/// The quantized weight of a linear layer, shape `[out, in]`.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantWeight {
    /// 8-bit affine, any granularity.
    Int8(AffineTensor),
    /// NF4 / FP4, with plain or double-quantized block scales.
    FourBit(FourBitTensor),
}

impl QuantWeight {
    /// The weight's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            QuantWeight::Int8(t) => t.shape(),
            QuantWeight::FourBit(t) => t.shape(),
        }
    }
    /// The scheme this weight is stored in.
    pub fn scheme(&self) -> Scheme {
        match self {
            QuantWeight::Int8(t) => Scheme::Int8(t.granularity()),
            QuantWeight::FourBit(t) => Scheme::FourBit {
                format: t.format(),
                blocksize: t.blocksize(),
                double_quant: matches!(t.scales(), super::four_bit::BlockScales::Double(_)),
            },
        }
    }
    /// Bytes of packed weight and scales a forward pass reads (what bounds a memory-bound GEMV).
    pub fn packed_bytes(&self) -> usize {
        match self {
            QuantWeight::Int8(t) => t.codes().len() + 5 * t.scales().len(),
            QuantWeight::FourBit(t) => t.packed().len() + (t.scales().storage_bits() / 8) as usize,
        }
    }
}

/// Which adapters apply to which rows of `x` in a forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdapterSelection<'a> {
    /// Every enabled adapter applies to every row (the default).
    #[default]
    Enabled,
    /// Row `m` gets adapter `ids[m]` (an index into the layer's adapters) or none; the multi-adapter batch.
    PerRow(&'a [Option<usize>]),
}

/// A borrowed quantized linear layer: what the reference and the kernels compute with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerView<'a> {
    pub weight: &'a QuantWeight,
    pub out_features: usize,
    pub in_features: usize,
    pub bias: Option<&'a [f32]>,
    pub adapters: &'a [LoraAdapter],
    /// The interleaved copy of a 4-bit weight for the VNNI int8-activation kernel, when built.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub act8_interleaved: Option<&'a crate::cpu::linear_act8_interleaved::Act8Interleaved>,
}

impl<'a> LayerView<'a> {
    /// Whether adapter `a` applies to row `row` under `sel`.
    #[inline]
    pub fn uses(&self, sel: AdapterSelection<'_>, row: usize, a: usize) -> bool {
        match sel {
            AdapterSelection::Enabled => self.adapters[a].is_enabled(),
            AdapterSelection::PerRow(ids) => ids[row] == Some(a),
        }
    }

    /// The adapters that apply to row `row` under `sel`, in id order.
    pub fn adapters_for_row(self, sel: AdapterSelection<'a>, row: usize) -> impl Iterator<Item = usize> + 'a {
        (0..self.adapters.len()).filter(move |&a| self.uses(sel, row, a))
    }

    /// Decoded f32 block scales of a 4-bit weight (empty for int8).
    #[inline]
    pub fn block_scales(&self) -> &'a [f32] {
        match self.weight {
            QuantWeight::FourBit(t) => t.decoded_scales(),
            QuantWeight::Int8(_) => &[],
        }
    }
}
