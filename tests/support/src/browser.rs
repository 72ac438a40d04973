//! A real headless Chromium for a test, driven over WebDriver: Debian's `chromium` and
//! `chromium-driver`, the driver listening on 127.0.0.1 only. Blocking methods (the tests
//! are synchronous); the browser and driver end when this is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

const CHROMIUM: &str = "/usr/bin/chromium";
const DRIVER: &str = "/usr/bin/chromedriver";

pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    /// Where the browser saves downloads.
    pub downloads: PathBuf,
}

impl Browser {
    /// A browser saving downloads under `dir`.
    pub fn start(dir: &Path) -> Browser {
        for p in [CHROMIUM, DRIVER] {
            assert!(
                Path::new(p).exists(),
                "{p} is not installed (Debian packages chromium and chromium-driver): these tests need a real browser"
            );
        }
        let downloads = dir.join("downloads");
        std::fs::create_dir_all(&downloads).unwrap();
        let port = crate::smtp::free_port();
        let driver = Command::new(DRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver does not listen on 127.0.0.1:{port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                // Root in a container: no sandbox; /dev/shm may be small.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1100", "--no-first-run", "--disable-extensions"],
                "prefs": {
                    "download.default_directory": downloads.display().to_string(),
                    "download.prompt_for_download": false,
                },
            }
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .expect("cannot start a Chromium session");
        Browser {
            rt,
            client: Some(client),
            driver,
            downloads,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    pub fn goto(&self, url: &str) {
        self.rt
            .block_on(self.c().goto(url))
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// Types `text` into the element `css` names (after clearing it).
    pub fn fill(&self, css: &str, text: &str) {
        self.rt
            .block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.clear().await?;
                e.send_keys(text).await
            })
            .unwrap_or_else(|e| panic!("fill {css}: {e}"));
    }

    pub fn click(&self, css: &str) {
        self.rt
            .block_on(async { self.c().find(Locator::Css(css)).await?.click().await })
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    pub fn select(&self, css: &str, value: &str) {
        self.rt
            .block_on(async { self.c().find(Locator::Css(css)).await?.select_by_value(value).await })
            .unwrap_or_else(|e| panic!("select {value} in {css}: {e}"));
    }

    /// The text content of every element `css` names (empty when there is none), read
    /// by script so hidden and scrolled-off text counts too.
    pub fn texts(&self, css: &str) -> Vec<String> {
        let v = self
            .rt
            .block_on(self.c().execute(
                "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.textContent)",
                vec![css.into()],
            ))
            .unwrap_or_else(|e| panic!("read {css}: {e}"));
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_string())
            .collect()
    }

    pub fn text(&self, css: &str) -> String {
        self.texts(css).into_iter().next().unwrap_or_default()
    }

    /// A script's value (`return …`).
    pub fn eval(&self, script: &str) -> serde_json::Value {
        self.rt
            .block_on(self.c().execute(script, vec![]))
            .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    /// Waits until `ok` holds of the text of `css`; the last text.
    pub fn wait_text(&self, css: &str, limit: Duration, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let t = self.text(css);
            if ok(&t) {
                return t;
            }
            assert!(Instant::now() < deadline, "{css} still says {t:?} after {limit:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Saves a PNG of the page at `path`.
    pub fn screenshot(&self, path: &Path) {
        let png = self.rt.block_on(self.c().screenshot()).expect("screenshot");
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Waits for a finished download named `name`; its bytes.
    pub fn downloaded(&self, name: &str, limit: Duration) -> Vec<u8> {
        let path = self.downloads.join(name);
        let partial = self.downloads.join(format!("{name}.crdownload"));
        let deadline = Instant::now() + limit;
        while !path.exists() || partial.exists() {
            assert!(Instant::now() < deadline, "{name} was not downloaded in {limit:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        std::fs::read(path).unwrap()
    }
}

/// Where tests keep what a person looks at afterwards (screenshots):
/// `$ATOM_TEST_ARTIFACTS`, default `target/test-artifacts` in the workspace.
pub fn artifacts_dir() -> PathBuf {
    std::env::var_os("ATOM_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts"))
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.close());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
