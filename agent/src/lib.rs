//! The Atom update agent.
//!
//! [`update`] is the pipeline (check → unbootable → write → verify → flip); [`verbs`] the
//! flag-only verbs and status; [`host`] finds what runs here; [`source`] reads mirrors;
//! [`slotio`] reads and writes slots on the disk.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod etc;
pub mod failpoint;
pub mod health;
pub mod host;
pub mod install;
pub mod perms;
pub mod progress;
pub mod reboot;
mod routes;
pub mod slotio;
pub mod source;
pub mod space;
pub mod state;
pub mod trust;
pub mod update;
pub mod verbs;
