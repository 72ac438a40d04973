//! A real PostgreSQL server for a test: Debian's binaries, a fresh cluster in a temporary
//! directory, run as the unprivileged user `nobody` (PostgreSQL refuses to run as root),
//! listening only on 127.0.0.1 at a free port. Stopped and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

/// The newest /usr/lib/postgresql/VERSION/bin holding initdb.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .expect("PostgreSQL is not installed (Debian package postgresql): these tests need a real server")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn as_nobody(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "nobody", "--"]).arg(program).current_dir("/");
    c
}

fn ok(c: &mut Command, what: &str) {
    let out = c
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(format!("atom-pg-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let uid = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, "nobody"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("the user nobody")
        };
        std::os::unix::fs::chown(&dir, Some(uid("-u")), Some(uid("-g"))).unwrap();
        let data = dir.join("data");
        ok(
            as_nobody(&bin.join("initdb")).arg("-D").arg(&data).args([
                "-U",
                "atom",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]),
            "initdb",
        );
        // Ports can be taken between the probe and the start: a few tries.
        for attempt in 0..5 {
            let port = free_port();
            let opts = format!(
                "-k {} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
                dir.display()
            );
            let status = as_nobody(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-o", &opts, "-l"])
                .arg(dir.join("server.log"))
                .args(["-w", "-t", "60", "start"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .unwrap();
            if status.success() {
                return Postgres { dir, bin, port };
            }
            eprintln!("PostgreSQL did not start on port {port} (try {attempt})");
        }
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        panic!("PostgreSQL did not start: {log}");
    }

    /// A new, empty database on this server, as a URL.
    pub fn database(&self, name: &str) -> String {
        ok(
            as_nobody(&self.bin.join("createdb")).args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "atom",
                name,
            ]),
            "createdb",
        );
        format!("postgres://atom@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_nobody(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
