//! Byte storage for quantized tensors: owned, or a view into bytes shared with other tensors (typically a
//! memory-mapped checkpoint, see `io::Checkpoint`).
//!
//! [`Bytes`] is what [`FourBitTensor`](crate::nf4::FourBitTensor) keeps its packed 4-bit codes in,
//! [`DoubleQuantScales`](crate::double_quant::DoubleQuantScales) its 8-bit scale codes and
//! [`AffineTensor`](crate::affine::AffineTensor) its int8 codes and zero points. Kernels only ever see a
//! `&[u8]` (`Bytes` derefs to one), so a layer built over a mapped file runs the same code, with the same bits,
//! as one built from a `Vec<u8>`.
//!
//! The shared side is a trait object, [`SharedBytes`] (`Arc<dyn AsRef<[u8]> + Send + Sync>`), so this data layer
//! does not depend on any mapping crate: a `memmap2::Mmap`, a `Vec<u8>` or a `Box<[u8]>` all fit.
//!
//! ```
//! use lowbit::storage::{Bytes, SharedBytes};
//! use std::sync::Arc;
//!
//! let owned = Bytes::from(vec![1u8, 2, 3]);
//! let shared: SharedBytes = Arc::new(vec![0u8, 1, 2, 3, 4]);
//! let view = Bytes::view(shared, 1..4)?; // no copy: bytes 1, 2, 3 of the shared buffer
//! assert_eq!(view, owned); // equality compares contents
//! assert!(view.is_view() && !owned.is_view());
//! assert_eq!(&view[..], &[1, 2, 3]);
//! # Ok::<(), lowbit::Error>(())
//! ```

use crate::{Error, Result};
use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// Bytes shared between many [`Bytes`] views (a memory-mapped file, a buffer read once).
///
/// Contract: `as_ref()` returns the same slice (same length and contents) on every call, as `Vec<u8>`,
/// `Box<[u8]>` and `memmap2::Mmap` do. A [`Bytes`] view checks its range against the length once, when it is
/// built; an implementation that later returns a shorter slice makes reading the view panic (never read out
/// of bounds).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A byte array that is either owned (a `Vec<u8>`) or a view `[start, start + len)` into [`SharedBytes`].
///
/// * Derefs to `[u8]`; every accessor of the tensor types returns that borrowed slice.
/// * `Clone` copies an owned array and is cheap (a reference count) for a view.
/// * `PartialEq` compares contents: an owned array equals a view of the same bytes.
/// * `Debug` prints the length and the kind, never the bytes.
#[derive(Clone)]
pub struct Bytes(Repr);

#[derive(Clone)]
enum Repr {
    Owned(Vec<u8>),
    View { source: SharedBytes, start: usize, len: usize },
}

impl Bytes {
    /// An empty owned array.
    pub const fn new() -> Bytes {
        Bytes(Repr::Owned(Vec::new()))
    }

    /// A view of `range` of `source`, sharing its bytes (no copy). Errors if the range is reversed or does not
    /// lie within the source's length.
    pub fn view(source: SharedBytes, range: Range<usize>) -> Result<Bytes> {
        let total = (*source).as_ref().len();
        if range.start > range.end || range.end > total {
            return Err(Error::invalid(
                "range",
                format!("{range:?}"),
                format!("a range within the {total} bytes of the shared buffer"),
            ));
        }
        Ok(Bytes(Repr::View { source, start: range.start, len: range.end - range.start }))
    }

    /// A view of the whole of `source`.
    pub fn view_all(source: SharedBytes) -> Bytes {
        let len = (*source).as_ref().len();
        Bytes(Repr::View { source, start: 0, len })
    }

    /// Whether the bytes are a view into shared storage (as opposed to an owned `Vec<u8>`).
    pub fn is_view(&self) -> bool {
        matches!(self.0, Repr::View { .. })
    }

    /// The bytes as a slice (also available through `Deref`).
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Owned(v) => v,
            // The range was checked against the length when the view was built; `SharedBytes` promises the
            // same slice on every call (indexing panics rather than reads out of bounds if it lies).
            Repr::View { source, start, len } => &(**source).as_ref()[*start..*start + *len],
        }
    }

    /// The bytes as an owned vector: moved out when owned, copied from a view.
    pub fn into_vec(self) -> Vec<u8> {
        match self.0 {
            Repr::Owned(v) => v,
            Repr::View { .. } => self.as_slice().to_vec(),
        }
    }

    /// An owned copy of these bytes (a view becomes independent of its shared storage).
    pub fn to_owned_bytes(&self) -> Bytes {
        Bytes(Repr::Owned(self.as_slice().to_vec()))
    }
}

impl Default for Bytes {
    fn default() -> Bytes {
        Bytes::new()
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::borrow::Borrow<[u8]> for Bytes {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Bytes {
        Bytes(Repr::Owned(v))
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Bytes {
        Bytes(Repr::Owned(v.to_vec()))
    }
}

impl From<Box<[u8]>> for Bytes {
    fn from(v: Box<[u8]>) -> Bytes {
        Bytes(Repr::Owned(v.into_vec()))
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Bytes) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Bytes {}

impl PartialEq<[u8]> for Bytes {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_slice() == other
    }
}

impl PartialEq<Vec<u8>> for Bytes {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl std::hash::Hash for Bytes {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state)
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_view() { "view" } else { "owned" };
        write!(f, "Bytes({} bytes, {kind})", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_owned_and_equality() {
        let shared: SharedBytes = Arc::new(vec![9u8, 8, 7, 6]);
        let v = Bytes::view(shared.clone(), 1..3).unwrap();
        assert_eq!(&*v, &[8, 7]);
        assert_eq!(v, Bytes::from(vec![8, 7]));
        assert!(v.is_view());
        assert_eq!(format!("{v:?}"), "Bytes(2 bytes, view)");
        assert!(Bytes::view(shared.clone(), 3..5).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = Bytes::view(shared.clone(), 3..2);
        assert!(reversed.is_err());
        assert_eq!(Bytes::view_all(shared).len(), 4);
        assert_eq!(v.clone().into_vec(), vec![8, 7]);
        assert!(!v.to_owned_bytes().is_view());
        assert_eq!(Bytes::default().len(), 0);
    }
}
