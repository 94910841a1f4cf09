//! Every error type of keyfold-core in one place, for callers. Each layer
//! owns its errors (`format::error`, `wrap::error`, `keyring::error`); this
//! module only re-exports them, and no layer imports it.

pub use crate::format::context::ContextError;
pub use crate::format::error::{CryptoError, FormatError, StreamError};
pub use crate::format::rng::RngError;
pub use crate::keyring::error::Error;
pub use crate::keyring::store::StoreError;
pub use crate::wrap::error::{WrapError, WrapErrorKind, WrapOperation};
