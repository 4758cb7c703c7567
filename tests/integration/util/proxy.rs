//! A TCP proxy a test can cut and restore, to make a real server go away and come back.

use tokio::net::TcpListener;

/// A TCP proxy on a loopback port to `upstream`, which a test can cut and restore to make a
/// real server unreachable and reachable again.
pub(crate) struct Proxy {
    pub(crate) port: u16,
    upstream: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub(crate) async fn start(upstream: &str) -> Self {
        let mut proxy = Self {
            port: 0,
            upstream: upstream.to_owned(),
            task: None,
        };
        proxy.restore().await;
        proxy
    }

    /// Closes the port and every connection through it.
    pub(crate) fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub(crate) async fn restore(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.port = listener.local_addr().unwrap().port();
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}
