//! (being written by the GPU work)
