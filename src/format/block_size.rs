//! The block sizes of blockwise formats: 4-bit blocks and the nested blocks of double-quantized scales.

use crate::{Error, Result};

/// The block sizes bitsandbytes accepts (powers of two from 32 to 4096); 64 is its default.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Checks a block size against [`BLOCK_SIZES`].
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCK_SIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::invalid("blocksize", blocksize, format!("one of {BLOCK_SIZES:?}")))
    }
}
