//! The int8 file layout written by `lowbit quantize --scheme int8` and read by `dequantize` and `inspect`:
//! the library's [`lowbit::io::int8`] (keys `NAME`, `NAME.scale`, `NAME.zero_point` and `lowbit.*` metadata),
//! re-exported so the commands share one definition with library users.

pub use lowbit::io::int8::*;
