//! (in progress) see issue 3.
