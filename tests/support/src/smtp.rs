//! A real SMTP server for a test: Debian's `aiosmtpd` (python3-aiosmtpd) on 127.0.0.1,
//! storing what it receives in a Maildir; the mails are read back with Python's own
//! `email` parser, a second opinion on what the sender wrote. Stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's interpreter, not one a developer's PATH may put first (pyenv and the like
/// lack Debian's python3-aiosmtpd).
const PYTHON: &str = "/usr/bin/python3";

pub struct Smtp {
    child: Child,
    maildir: PathBuf,
    pub port: u16,
}

/// One mail as the server stored it, decoded.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: String,
    pub subject: String,
    /// The text/plain part.
    pub text: String,
    /// Attachments: file name and decoded content.
    pub attachments: Vec<(String, Vec<u8>)>,
}

impl Smtp {
    /// A server on `port` (0: a free one).
    pub fn start(dir: &Path, port: u16) -> Smtp {
        assert!(
            Path::new(PYTHON).exists()
                && Command::new(PYTHON)
                    .args(["-c", "import aiosmtpd"])
                    .status()
                    .is_ok_and(|s| s.success()),
            "{PYTHON} with aiosmtpd is not installed (Debian package python3-aiosmtpd): these tests need a real SMTP server"
        );
        let port = if port == 0 { free_port() } else { port };
        let maildir = dir.join(format!("maildir-{port}"));
        let child = Command::new(PYTHON)
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start aiosmtpd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "aiosmtpd does not listen on 127.0.0.1:{port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Smtp { child, maildir, port }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every mail received so far, decoded by Python's `email` package.
    pub fn mails(&self) -> Vec<Mail> {
        let out = Command::new(PYTHON)
            .args(["-c", DECODE])
            .arg(&self.maildir)
            .output()
            .expect("cannot run python3");
        assert!(
            out.status.success(),
            "cannot read the Maildir: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // One record per mail: fields separated by \x1e, attachments by \x1f (hex content).
        String::from_utf8(out.stdout)
            .unwrap()
            .split('\x1d')
            .filter(|r| !r.is_empty())
            .map(|r| {
                let f: Vec<&str> = r.split('\x1e').collect();
                let attachments = f[4]
                    .split('\x1f')
                    .filter(|a| !a.is_empty())
                    .map(|a| {
                        let (name, hex) = a.split_once('=').unwrap();
                        (name.to_string(), from_hex(hex))
                    })
                    .collect();
                Mail {
                    from: f[0].into(),
                    to: f[1].into(),
                    subject: f[2].into(),
                    text: f[3].into(),
                    attachments,
                }
            })
            .collect()
    }
}

const DECODE: &str = r#"
import mailbox, sys
from email import policy
from email.parser import BytesParser
box = mailbox.Maildir(sys.argv[1], create=False)
out = []
for key in sorted(box.keys()):
    m = BytesParser(policy=policy.default).parsebytes(box.get_bytes(key))
    text = m.get_body(preferencelist=("plain",))
    atts = [f"{a.get_filename()}={a.get_content().hex() if isinstance(a.get_content(), bytes) else a.get_content().encode().hex()}" for a in m.iter_attachments()]
    out.append("\x1e".join([str(m["From"]), str(m["To"]), str(m["Subject"]), text.get_content() if text else "", "\x1f".join(atts)]))
sys.stdout.write("\x1d".join(out))
"#;

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
