//! GGUF metadata value types: the type ids of the format (`gguf_type`), their minimum encoded sizes (what
//! bounds allocation while parsing) and the accessors on [`GgufValue`].

use super::GgufValue;
use std::fmt;

/// `GGUF_TYPE_ARRAY`, the one type whose values hold other values.
pub(crate) const TYPE_ARRAY: u32 = 9;
/// `GGUF_TYPE_STRING`.
pub(crate) const TYPE_STRING: u32 = 8;

/// The name of GGUF value type `id` (`u8` … `f64`, `string`, `array`), or `None` for an id GGUF does not define.
pub(crate) fn type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "u8",
        1 => "i8",
        2 => "u16",
        3 => "i16",
        4 => "u32",
        5 => "i32",
        6 => "f32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "u64",
        11 => "i64",
        12 => "f64",
        _ => return None,
    })
}

/// The fewest bytes one value of type `id` occupies in a file: its fixed size, the 8-byte length of a string,
/// or the 4-byte element type and 8-byte count of an array. `None` for an undefined id.
pub(crate) fn min_encoded_size(id: u32) -> Option<usize> {
    Some(match id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        TYPE_STRING => 8,
        TYPE_ARRAY => 12,
        _ => return None,
    })
}

impl GgufValue {
    /// The GGUF type id of this value (`gguf_type`: 0 = u8, 1 = i8, 2 = u16, 3 = i16, 4 = u32, 5 = i32,
    /// 6 = f32, 7 = bool, 8 = string, 9 = array, 10 = u64, 11 = i64, 12 = f64).
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => TYPE_STRING,
            GgufValue::Array(_) => TYPE_ARRAY,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// A short description of the value's type for messages: `u32`, `string`, `array of string`,
    /// `empty array`.
    pub fn type_description(&self) -> String {
        match self {
            GgufValue::Array(items) => match items.first() {
                Some(first) => format!("array of {}", first.type_description()),
                None => "empty array".into(),
            },
            other => type_name(other.type_id()).unwrap_or("?").into(),
        }
    }

    /// The string, if this is a [`GgufValue::String`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a `u64`, if it is an integer (of any width or signedness) that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `i64`, if it is an integer (of any width or signedness) that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `f64`, if it is a float (f32 widened exactly) or an integer that f64 represents
    /// exactly (magnitude at most 2^53); never a rounded value.
    pub fn as_f64(&self) -> Option<f64> {
        const EXACT: u64 = 1 << 53;
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::Bool(_) | GgufValue::String(_) | GgufValue::Array(_) => None,
            _ => {
                let v = self.as_i64()?;
                (v.unsigned_abs() <= EXACT).then_some(v as f64)
            }
        }
    }

    /// The value, if it is a [`GgufValue::Bool`].
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if this is a [`GgufValue::Array`].
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// Array elements shown by [`GgufValue`]'s `Display` before it elides the rest.
const SHOWN_ELEMENTS: usize = 8;

/// For messages and listings: numbers and bools plainly, strings quoted (Rust escapes), arrays as
/// `[a, b, …]` with at most 8 elements shown and the count of the rest.
impl fmt::Display for GgufValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(v) => write!(f, "{v}"),
            GgufValue::I8(v) => write!(f, "{v}"),
            GgufValue::U16(v) => write!(f, "{v}"),
            GgufValue::I16(v) => write!(f, "{v}"),
            GgufValue::U32(v) => write!(f, "{v}"),
            GgufValue::I32(v) => write!(f, "{v}"),
            GgufValue::U64(v) => write!(f, "{v}"),
            GgufValue::I64(v) => write!(f, "{v}"),
            GgufValue::F32(v) => write!(f, "{v}"),
            GgufValue::F64(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
            GgufValue::String(s) => write!(f, "{s:?}"),
            GgufValue::Array(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().take(SHOWN_ELEMENTS).enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                if items.len() > SHOWN_ELEMENTS {
                    write!(f, ", … ({} more)", items.len() - SHOWN_ELEMENTS)?;
                }
                f.write_str("]")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_convert_only_exactly() {
        assert_eq!(GgufValue::I32(-1).as_u64(), None);
        assert_eq!(GgufValue::I32(7).as_u64(), Some(7));
        assert_eq!(GgufValue::U64(u64::MAX).as_i64(), None);
        assert_eq!(GgufValue::U64(1 << 53).as_f64(), Some(9007199254740992.0));
        assert_eq!(GgufValue::U64((1 << 53) + 1).as_f64(), None);
        assert_eq!(GgufValue::F32(0.1).as_f64(), Some(f64::from(0.1f32)));
        assert_eq!(GgufValue::F32(1.0).as_u64(), None);
        assert_eq!(GgufValue::Bool(true).as_i64(), None);
        assert_eq!(GgufValue::String("x".into()).as_str(), Some("x"));
        assert_eq!(GgufValue::Array(vec![]).type_description(), "empty array");
        let nested = GgufValue::Array(vec![GgufValue::Array(vec![GgufValue::U8(1)])]);
        assert_eq!(nested.type_description(), "array of array of u8");
        for id in 0..13 {
            assert!(type_name(id).is_some() && min_encoded_size(id).is_some());
        }
        assert!(type_name(13).is_none() && min_encoded_size(13).is_none());
        let long = GgufValue::Array((0..10).map(GgufValue::U8).collect());
        assert_eq!(long.to_string(), "[0, 1, 2, 3, 4, 5, 6, 7, … (2 more)]");
        assert_eq!(GgufValue::String("a\"b".into()).to_string(), r#""a\"b""#);
    }
}
