//! A real headless Chromium, driven over the DevTools protocol (a WebSocket, JSON commands),
//! and a TCP proxy the tests can cut, for browser tests of the client and the demo page.

use std::collections::HashMap;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::WAIT;

/// Where `make test`'s set-up installs Chromium (Debian's package); `CHROMIUM` overrides.
const CHROMIUM: &str = "/usr/bin/chromium";

/// One browser with one page.
pub struct Browser {
    child: Child,
    profile: PathBuf,
    devtools: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    /// Uncaught exceptions and console errors of the page, for failure messages.
    pub page_errors: Vec<String>,
    /// `load` events of the page so far: a reload is over when this grows.
    loads: u64,
}

impl Browser {
    /// Starts Chromium headless with an empty profile and opens one blank page.
    pub async fn launch() -> anyhow::Result<Self> {
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_owned());
        let profile = std::env::temp_dir().join(format!(
            "gateway-browser-{}-{}",
            std::process::id(),
            uuid_like()
        ));
        std::fs::create_dir_all(&profile)?;
        // Without the background-networking flags Chromium spends its start trying to reach
        // Google's services, which a closed network refuses.
        let mut child = Command::new(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--remote-debugging-port=0",
                "--window-size=1280,860",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!("cannot start {binary}: `make test` installs Debian's chromium package")
            })?;
        let stderr = child.stderr.take().context("chromium's stderr")?;
        let endpoint = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || {
                let mut lines = std::io::BufReader::new(stderr).lines();
                let mut seen = Vec::new();
                for line in lines.by_ref() {
                    let line = line.ok()?;
                    if let Some(url) = line.strip_prefix("DevTools listening on ") {
                        let url = url.trim().to_owned();
                        // Keep draining stderr so Chromium never blocks on a full pipe.
                        std::thread::spawn(move || for _ in lines {});
                        return Some(Ok(url));
                    }
                    seen.push(line);
                }
                Some(Err(seen.join("\n")))
            }),
        )
        .await
        .context("chromium did not open its DevTools port within 30 s")??;
        let endpoint = match endpoint {
            Some(Ok(url)) => url,
            Some(Err(output)) => bail!("chromium exited before DevTools was up:\n{output}"),
            None => bail!("cannot read chromium's output"),
        };
        let (devtools, _) = tokio_tungstenite::connect_async(endpoint.as_str()).await?;
        let mut browser = Browser {
            child,
            profile,
            devtools,
            session: String::new(),
            next_id: 0,
            page_errors: Vec::new(),
            loads: 0,
        };
        let target = browser
            .command(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = browser
            .command(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target, "flatten": true }),
            )
            .await?;
        browser.session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_owned();
        for domain in ["Page.enable", "Runtime.enable"] {
            browser.page(domain, json!({})).await?;
        }
        browser
            .page(
                "Emulation.setDeviceMetricsOverride",
                json!({ "width": 1280, "height": 860, "deviceScaleFactor": 1, "mobile": false }),
            )
            .await?;
        Ok(browser)
    }

    /// Loads `url` and waits for the document to finish loading.
    pub async fn goto(&mut self, url: &str) -> anyhow::Result<()> {
        let answer = self.page("Page.navigate", json!({ "url": url })).await?;
        if let Some(error) = answer.get("errorText") {
            bail!("cannot load {url}: {error}");
        }
        self.wait_for("the page to load", "document.readyState === 'complete'")
            .await?;
        Ok(())
    }

    /// Reloads the page as its user would (the document's navigation type is `reload`) and
    /// waits for the new document's `load` event.
    pub async fn reload(&mut self) -> anyhow::Result<()> {
        let loads = self.loads;
        self.page("Page.reload", json!({ "ignoreCache": true }))
            .await?;
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.loads == loads {
            let next = tokio::time::timeout_at(deadline, self.devtools.next())
                .await
                .context("the reloaded page did not load")?;
            let Some(frame) = next else {
                bail!("chromium closed the DevTools connection during a reload");
            };
            if let Message::Text(text) = frame? {
                self.note_event(&serde_json::from_str(&text)?);
            }
        }
        Ok(())
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value as JSON.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let answer = self
            .page(
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await?;
        if let Some(exception) = answer.get("exceptionDetails") {
            bail!(
                "{expression}: threw {}",
                exception["exception"]["description"]
                    .as_str()
                    .unwrap_or(&exception.to_string())
            );
        }
        Ok(answer["result"]["value"].clone())
    }

    /// Waits, inside the page, until `condition` (a JS expression) is truthy, and returns its
    /// value; fails naming `what` after [`WAIT`]. The page is polled where it runs, so no
    /// frame or event is missed between two looks.
    pub async fn wait_for(&mut self, what: &str, condition: &str) -> anyhow::Result<Value> {
        let ms = WAIT.as_millis();
        let script = format!(
            "(async () => {{ const end = Date.now() + {ms};
               while (true) {{
                 let v; try {{ v = ({condition}); }} catch (e) {{ v = undefined; }}
                 if (v) return {{ ok: true, value: v }};
                 if (Date.now() > end) return {{ ok: false }};
                 await new Promise(r => setTimeout(r, 20));
               }} }})()"
        );
        let answer = self.eval(&script).await?;
        if answer["ok"] != json!(true) {
            let state = self
                .eval("JSON.stringify(window.demo ?? null)")
                .await
                .unwrap_or_default();
            bail!(
                "{what}: `{condition}` not true within {WAIT:?}\npage state: {state}\npage errors: {:?}",
                self.page_errors
            );
        }
        Ok(answer["value"].clone())
    }

    /// A PNG of the page as it is now, written to `path`.
    pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        let shot = self
            .page("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().context("screenshot data")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    async fn page(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let session = self.session.clone();
        self.command(Some(&session), method, params).await
    }

    /// Sends one DevTools command and reads until its answer, noting page errors on the way.
    async fn command(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.devtools
            .send(Message::text(message.to_string()))
            .await?;
        // Long enough for a `wait_for` evaluation, which itself gives up after WAIT.
        let deadline = tokio::time::Instant::now() + WAIT + Duration::from_secs(20);
        loop {
            let next = tokio::time::timeout_at(deadline, self.devtools.next())
                .await
                .with_context(|| format!("no answer to {method}"))?;
            let Some(frame) = next else {
                bail!("chromium closed the DevTools connection during {method}");
            };
            let Message::Text(text) = frame? else {
                continue;
            };
            let value: Value = serde_json::from_str(&text)?;
            if value["id"] == json!(id) {
                if let Some(error) = value.get("error") {
                    bail!("{method}: {error}");
                }
                return Ok(value["result"].clone());
            }
            self.note_event(&value);
        }
    }

    fn note_event(&mut self, event: &Value) {
        match event["method"].as_str() {
            Some("Page.loadEventFired") => self.loads += 1,
            Some("Runtime.exceptionThrown") => self.page_errors.push(
                event["params"]["exceptionDetails"]["exception"]["description"]
                    .as_str()
                    .unwrap_or("exception")
                    .to_owned(),
            ),
            Some("Runtime.consoleAPICalled") if event["params"]["type"] == "error" => {
                self.page_errors
                    .push(event["params"]["args"][0]["value"].to_string());
            }
            _ => {}
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Browser tests run one at a time: several Chromiums on two cores would make the timing
/// of a token refresh a matter of luck.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A TCP proxy in front of a gateway, so a test can drop a browser's connections the way a
/// network does (no close frame: 1006 on the page), refuse new ones for a while, point at
/// another gateway, and refuse WebSocket upgrades as some corporate proxies do.
pub struct Proxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    refusing: Arc<AtomicBool>,
    refusing_upgrades: Arc<AtomicBool>,
    links: Arc<Mutex<HashMap<u64, AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let refusing = Arc::new(AtomicBool::new(false));
        let refusing_upgrades = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<HashMap<u64, AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let (target, refusing, links) = (target.clone(), refusing.clone(), links.clone());
            let refusing_upgrades = refusing_upgrades.clone();
            async move {
                let mut next = 0u64;
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if refusing.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    next += 1;
                    let id = next;
                    let to = *target.lock().unwrap();
                    let forget = links.clone();
                    let check = refusing_upgrades.load(Ordering::SeqCst);
                    let link = tokio::spawn(async move {
                        // A browser opens each WebSocket on a connection of its own, so the
                        // first request tells.
                        let head = match check {
                            true => match refuse_upgrade(&mut inbound).await {
                                Some(head) => head,
                                None => return,
                            },
                            false => Vec::new(),
                        };
                        if let Ok(mut outbound) = TcpStream::connect(to).await {
                            use tokio::io::AsyncWriteExt as _;
                            if outbound.write_all(&head).await.is_err() {
                                return;
                            }
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                        forget.lock().unwrap().remove(&id);
                    });
                    links.lock().unwrap().insert(id, link.abort_handle());
                }
            }
        })
        .abort_handle();
        Proxy {
            addr,
            target,
            refusing,
            refusing_upgrades,
            links,
            accept,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        for (_, link) in self.links.lock().unwrap().drain() {
            link.abort();
        }
    }

    /// Answers every WebSocket handshake from now on with 403, as a proxy that allows only
    /// plain HTTP does; other requests pass.
    pub fn refuse_upgrades(&self) {
        self.refusing_upgrades.store(true, Ordering::SeqCst);
    }

    /// Accepts connections again, forwarding them to `target` from now on.
    pub fn restore(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
        self.refusing.store(false, Ordering::SeqCst);
    }
}

/// Reads a connection's first request head: a WebSocket handshake is answered 403 and
/// closed (`None`); anything else comes back, to be forwarded.
async fn refuse_upgrade(inbound: &mut TcpStream) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = inbound.read(&mut buf).await.ok()?;
        if n == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if text.contains("\r\nupgrade: websocket") {
        let _ = inbound
            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        return None;
    }
    Some(head)
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for (_, link) in self.links.lock().unwrap().drain() {
            link.abort();
        }
    }
}
