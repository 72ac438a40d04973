//! Helpers shared by the integration tests of the Atom crates, so each test suite does not
//! carry its own copy: disks and GPT tampering, a real PostgreSQL, a real SMTP server, a real headless Chromium.

pub mod browser;
pub mod gpt;
pub mod postgres;
pub mod smtp;
