//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `passflow` binary built for these tests. The process is killed when the thread that
/// starts it ends (each test runs on a thread of its own): a test that fails or times out
/// leaves no instance running behind it, even one it had stopped with SIGSTOP.
pub fn passflow() -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_passflow"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    // SAFETY: prctl is async-signal-safe, and the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("PASSFLOW__")) {
        cmd.env_remove(key);
    }
    cmd
}

/// A small simulated day (city folder, passes.jsonl, labels.json), made once per test run.
pub fn small_day() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("passflow-it-day-{}", std::process::id()));
        let out = passflow()
            .args(["simulate", "--out"])
            .arg(&dir)
            .args(["--vehicles", "1500", "--seed", "11"])
            .output()
            .expect("passflow runs");
        assert!(out.status.success(), "simulate failed: {}", String::from_utf8_lossy(&out.stderr));
        dir
    })
}

pub fn labels(dir: &Path) -> passflow::simulator::Labels {
    serde_json::from_str(&std::fs::read_to_string(dir.join("labels.json")).expect("labels.json")).expect("labels parse")
}

/// The MariaDB server URL for tests (no database); CI fails loudly when it is unreachable.
pub fn mysql_server_url() -> String {
    std::env::var("PASSFLOW_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A fresh database of its own for one test; dropped by the returned guard.
pub struct TestDatabase {
    pub url: String,
    name: String,
}

impl TestDatabase {
    pub async fn create(tag: &str) -> TestDatabase {
        use sqlx::Connection;
        let server = mysql_server_url();
        let name = format!("passflow_{tag}_{}_{}", std::process::id(), rand_suffix());
        let mut conn = sqlx::MySqlConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("MariaDB at {server} is required for this test: {e}"));
        sqlx::query(&format!("CREATE DATABASE `{name}`")).execute(&mut conn).await.expect("create database");
        TestDatabase { url: format!("{server}/{name}"), name }
    }

    pub async fn drop_now(self) {
        use sqlx::Connection;
        if let Ok(mut conn) = sqlx::MySqlConnection::connect(&mysql_server_url()).await {
            let _ = sqlx::query(&format!("DROP DATABASE `{}`", self.name)).execute(&mut conn).await;
        }
    }
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() as u64)
}

/// A plain HTTP/1.1 GET against the service; returns status and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the API");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A TCP proxy in front of a server that a test can cut (every connection dropped, new ones
/// refused) and restore, to play a dependency going away without touching the shared server.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// No reply goes back any more, on any connection (a server that hangs).
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    pub async fn start(target: &str) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (target, flag, stall, held) = (target.to_owned(), cut.clone(), stalled.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    continue;
                }
                let (target, stall) = (target.clone(), stall.clone());
                let task = tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    let (mut from_client, mut to_client) = inbound.split();
                    let (mut from_server, mut to_server) = outbound.split();
                    let up = tokio::io::copy(&mut from_client, &mut to_server);
                    // Replies go back until a stall: from then on the connection stays open and
                    // nothing more comes back.
                    let down = async {
                        let mut buf = vec![0; 16 * 1024];
                        loop {
                            let n = from_server.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<(), std::io::Error>(());
                            }
                            if stall.load(Ordering::SeqCst) {
                                std::future::pending::<()>().await;
                            }
                            to_client.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
                held.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { addr, cut, stalled, connections }
    }

    /// Plays a server that hangs: requests still go through, and connections stay open, but
    /// no reply comes back on any connection, old or new.
    pub fn stall(&self) {
        self.stalled.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Forwards again (on connections made from now on: those that met a stall stay silent,
    /// as a hung server's do).
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        self.stalled.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The service on embedded defaults with everything it writes under `dir`, the sample city and
/// the API on a free port.
pub fn service_config(dir: &Path) -> passflow::config::Config {
    let mut config = passflow::config::Config::default();
    config.city.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/city").into();
    config.api.listen = "127.0.0.1:0".into();
    config.store.url = format!("sqlite://{}", dir.join("passflow.db").display());
    config.state.dir = dir.join("state");
    config.archive.dir = dir.join("archive");
    config.api.audit_log = dir.join("audit.log");
    config.pipelines.watchlist_file = dir.join("watchlist.csv");
    config.webhooks.queue = dir.join("webhooks.db");
    config
}
