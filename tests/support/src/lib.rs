//! Helpers shared by the integration tests of the Atom crates, so each test suite does not
//! carry its own copy.

pub mod gpt;
pub mod postgres;
