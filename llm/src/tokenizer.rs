//! (being written by the tokenizer work)
