//! Failures of the agent and the exit codes they map to (documented in `--help`).

use std::fmt;

pub const EXIT_ERROR: u8 = 1;
pub const EXIT_NO_UPDATE: u8 = 3;
pub const EXIT_VERIFY_FAILED: u8 = 4;
pub const EXIT_LOCKED: u8 = 5;
pub const EXIT_REFUSED: u8 = 6;
pub const EXIT_NOT_ALLOWED: u8 = 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Something went wrong; the message says what. Retrying may help.
    Error,
    /// The written slot did not match the signed digest; nothing was made bootable.
    VerifyFailed,
    /// Another atom-update holds the lock.
    Locked,
    /// A security rule refused the update (signature, expiry, board, downgrade).
    Refused,
    /// The verb does not apply to the current state (e.g. rollback with no valid other slot).
    NotAllowed,
}

#[derive(Debug)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl Failure {
    pub fn error(m: impl Into<String>) -> Self {
        Failure {
            kind: Kind::Error,
            message: m.into(),
        }
    }
    pub fn refused(m: impl Into<String>) -> Self {
        Failure {
            kind: Kind::Refused,
            message: m.into(),
        }
    }
    pub fn not_allowed(m: impl Into<String>) -> Self {
        Failure {
            kind: Kind::NotAllowed,
            message: m.into(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self.kind {
            Kind::Error => EXIT_ERROR,
            Kind::VerifyFailed => EXIT_VERIFY_FAILED,
            Kind::Locked => EXIT_LOCKED,
            Kind::Refused => EXIT_REFUSED,
            Kind::NotAllowed => EXIT_NOT_ALLOWED,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}
