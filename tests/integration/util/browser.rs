//! Debian's Chromium, headless, driven through chromedriver over WebDriver.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// Installs Debian's chromium and chromium-driver when they are missing, once per run, so
/// `cargo test` works on a fresh machine; fails loudly when that is not possible.
fn install() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let missing = || {
            [CHROMEDRIVER, CHROMIUM]
                .iter()
                .any(|p| !Path::new(p).exists())
        };
        if missing() {
            let apt = |args: &[&str]| {
                Command::new("apt-get")
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            let packages = ["install", "-y", "-qq", "chromium", "chromium-driver"];
            if !apt(&packages) {
                apt(&["update", "-qq"]);
                apt(&packages);
            }
        }
        assert!(
            !missing(),
            "{CHROMIUM} or {CHROMEDRIVER} is missing and could not be installed: the console's \
             browser tests need Debian's chromium and chromium-driver \
             (apt-get install chromium chromium-driver)"
        );
    });
}

/// A headless Chromium with its own empty profile; both go when it drops.
pub(crate) struct Browser {
    pub(crate) client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a browser session through it.
    pub(crate) async fn start() -> Self {
        install();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        // Without the networking switches, Chromium keeps calling home on a closed network.
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(error) if std::time::Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(error) => panic!("no browser session through chromedriver: {error}"),
            }
        };
        Self {
            client,
            driver,
            _profile: profile,
        }
    }

    /// The text of the first element `css` selects, waiting for it to appear. A live page
    /// may replace the element between finding and reading it: then it is found again.
    pub(crate) async fn text(&self, css: &str) -> String {
        let mut tries = 0;
        loop {
            let element = self
                .client
                .wait()
                .for_element(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no {css} on the page: {e}"));
            match element.text().await {
                Ok(text) => return text,
                Err(error) if tries < 10 && error.is_stale_element_reference() => tries += 1,
                Err(error) => panic!("cannot read {css}: {error}"),
            }
        }
    }

    /// Types `text` into the field `css` selects.
    pub(crate) async fn type_into(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// Clicks what `css` selects and waits for the next page to load.
    pub(crate) async fn click(&self, css: &str) {
        let before = self.client.find(Locator::Css("html")).await.unwrap();
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("nothing to click at {css}: {e}"))
            .click()
            .await
            .unwrap();
        // The old page's root goes stale once the new page replaced it.
        self.client
            .wait()
            .for_element(Locator::Css("html"))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while before.tag_name().await.is_ok() {
            assert!(std::time::Instant::now() < deadline, "{css} led nowhere");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Ends the browser session.
    pub(crate) async fn close(self) {
        self.client.clone().close().await.unwrap();
    }

    /// The page's path, without the origin.
    pub(crate) async fn path(&self) -> String {
        self.client.current_url().await.unwrap().path().to_owned()
    }

    /// Saves a screenshot of the page as `name`.png under `target/console-screenshots/`, and
    /// under `docs/console/` for the README when `FERRY_BLESS` is set.
    pub(crate) async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let mut folders = vec![super::repo().join("target/console-screenshots")];
        if std::env::var_os("FERRY_BLESS").is_some() {
            folders.push(super::repo().join("docs/console"));
        }
        for folder in folders {
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join(format!("{name}.png")), &png).unwrap();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
