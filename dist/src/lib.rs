//! The Atom repository format and the delta server.
//!
//! This crate is the single owner of every format that crosses the wire: signed channel
//! manifests, key files, the repository layout and the delta format. The builder writes
//! them, the agent and the server read them, and nobody else parses them.

pub mod delta;
pub mod digest;
pub mod evolve;
pub mod expiry;
pub mod fsutil;
pub mod install;
pub mod keys;
pub mod localfile;
pub mod manifest;
pub mod parse_error;
pub mod release;
pub mod repo;
pub mod roles;
#[cfg(feature = "server")]
pub mod server;
pub mod signature;
pub mod timestamp;
pub mod verify;

pub use digest::Digest;
pub use keys::{KeyId, PublicKey, SecretKey, TrustedKeys};
pub use manifest::Manifest;
pub use repo::Repository;
