//! llama-family GGUFs as Hugging Face sees them: tensor names (`blk.N.attn_q.weight` →
//! `model.layers.N.self_attn.q_proj.weight`), the Q/K row permutation llama.cpp's converter applies undone,
//! and a `config.json` built from the metadata.
