//! Shapes: how an N-dimensional tensor is seen as a row-major `[rows, cols]` matrix.
//!
//! The last dimension is the row (the "input" dimension of a `[out, in]` weight); every other dimension is
//! folded into the row count. A 0-d tensor is one row of one element.

use crate::{Error, Result};

/// Number of elements of `shape`, or an error if the product overflows `usize`.
pub fn numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid("shape", format!("{shape:?}"), "a shape whose element count fits in usize"))
}

/// `(rows, cols)` of `shape` seen as a matrix: `cols` is the last dimension, `rows` the product of the rest.
pub fn as_matrix(shape: &[usize]) -> Result<(usize, usize)> {
    let n = numel(shape)?;
    match shape.split_last() {
        None => Ok((1, 1)),
        Some((&cols, rest)) => Ok((n.checked_div(cols).map_or_else(|| numel(rest), Ok)?, cols)),
    }
}

/// Checks that `len` elements match `shape` and returns `(rows, cols)`.
pub fn check_len(arg: &'static str, len: usize, shape: &[usize]) -> Result<(usize, usize)> {
    let n = numel(shape)?;
    if n != len {
        return Err(Error::shape(format!("length of `{arg}` vs shape {shape:?}"), len, n));
    }
    as_matrix(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_views() {
        assert_eq!(as_matrix(&[]).unwrap(), (1, 1));
        assert_eq!(as_matrix(&[7]).unwrap(), (1, 7));
        assert_eq!(as_matrix(&[2, 3, 4]).unwrap(), (6, 4));
        assert_eq!(as_matrix(&[5, 0]).unwrap(), (5, 0));
        assert!(numel(&[usize::MAX, 2]).is_err());
        assert!(check_len("x", 5, &[2, 3]).is_err());
    }
}
