//! Hot reload: serving a new set of flows without dropping a request.
//!
//! The server asks [`Live`] for the current router on every request. A reload checks the
//! flows and schemas again; only a clean set replaces the old one, in one swap. Requests
//! already in hand finish on the set they started with, and the old set's delivery workers
//! and consumers finish what they hold before they stop; the new set's workers take over the
//! store's pending work. A set with problems is refused and its diagnostics logged, and the
//! old set keeps serving.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use tower::ServiceExt;

use crate::diagnostic::Diagnostic;
use crate::project::{ProjectPaths, load};
use crate::runtime::Runtime;
use crate::store::Store;

/// How long a replaced set may take to finish what it holds.
const DRAIN: Duration = Duration::from_secs(30);

/// The flows being served, replaceable while serving.
#[derive(Debug)]
pub struct Live {
    paths: ProjectPaths,
    client: reqwest::Client,
    store: Store,
    admin: Option<crate::admin::AdminTokens>,
    /// Whether metrics and the admin API have an address of their own.
    split: bool,
    current: RwLock<Served>,
    /// Told each time a new set is served.
    reloaded: tokio::sync::watch::Sender<()>,
}

/// One set of flows and the routers serving it.
#[derive(Debug)]
struct Served {
    runtime: Arc<Runtime>,
    main: Router,
    operations: Router,
}

impl Served {
    fn new(runtime: Arc<Runtime>, admin: Option<&crate::admin::AdminTokens>, split: bool) -> Self {
        let (main, operations) = if split {
            (
                crate::server::flows_router(&runtime),
                crate::server::operations_router(&runtime, admin),
            )
        } else {
            (crate::server::router(&runtime, admin), Router::new())
        };
        Self {
            runtime,
            main,
            operations,
        }
    }
}

impl Live {
    /// Serves `runtime` (built from `paths`), ready to be replaced by a reload. With `split`,
    /// metrics and the admin API are left out of [`Live::router`] for
    /// [`Live::operations_router`] to serve elsewhere.
    pub fn new(
        paths: ProjectPaths,
        client: reqwest::Client,
        store: Store,
        admin: Option<crate::admin::AdminTokens>,
        runtime: Arc<Runtime>,
        split: bool,
    ) -> Arc<Self> {
        let served = Served::new(runtime, admin.as_ref(), split);
        Arc::new(Self {
            paths,
            client,
            store,
            admin,
            split,
            current: RwLock::new(served),
            reloaded: tokio::sync::watch::Sender::new(()),
        })
    }

    /// A router that hands each request to the set being served when it arrives.
    pub fn router(self: &Arc<Self>) -> Router {
        self.delegate(|served| served.main.clone())
    }

    /// The same, for metrics and the admin API on their own address.
    pub fn operations_router(self: &Arc<Self>) -> Router {
        self.delegate(|served| served.operations.clone())
    }

    fn delegate(self: &Arc<Self>, pick: fn(&Served) -> Router) -> Router {
        let live = Arc::clone(self);
        Router::new().fallback(move |request: Request| {
            let router = pick(
                &live
                    .current
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            async move { router.oneshot(request).await }
        })
    }

    /// The runtime being served.
    pub fn runtime(&self) -> Arc<Runtime> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .runtime,
        )
    }

    /// Changes each time a reload serves a new set of flows.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<()> {
        self.reloaded.subscribe()
    }

    /// Loads and checks the flows again; a clean set replaces the one being served.
    ///
    /// # Errors
    ///
    /// The diagnostics of a set with errors, which is not served.
    pub fn reload(&self) -> Result<usize, Vec<Diagnostic>> {
        let project = load(&self.paths)?;
        let runtime = Runtime::start(&project, self.client.clone(), Some(self.store.clone()));
        let served = Served::new(runtime, self.admin.as_ref(), self.split);
        let old = std::mem::replace(
            &mut *self
                .current
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            served,
        );
        self.reloaded.send_replace(());
        // The old set lets go of nothing it holds: it finishes in the background.
        tokio::spawn(async move { old.runtime.stop(DRAIN).await });
        Ok(project.flows.len())
    }

    /// Reloads, logging the outcome.
    pub fn reload_and_log(&self) {
        match self.reload() {
            Ok(flows) => tracing::info!(flows, "reloaded: the new flows are served"),
            Err(diagnostics) => {
                for diagnostic in &diagnostics {
                    tracing::warn!(%diagnostic, "reload refused");
                }
                tracing::warn!(
                    problems = diagnostics.len(),
                    "reload refused: the flows being served stay"
                );
            }
        }
    }
}

/// Reloads `live` on SIGHUP and, with `watch`, whenever a file under `folders` changes.
pub fn spawn_triggers(live: &Arc<Live>, folders: &[PathBuf], watch: bool) {
    #[cfg(unix)]
    {
        // Installed before this returns, so a SIGHUP right after start-up reloads rather than
        // kills (the default action).
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hangup) => {
                let live = Arc::clone(live);
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reloading the flows");
                        live.reload_and_log();
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "SIGHUP does not reload the flows"),
        }
    }
    if watch {
        let (changes, mut changed) = tokio::sync::mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = changes.send(());
            }
        });
        let mut watcher = match watcher {
            Ok(watcher) => watcher,
            Err(error) => {
                tracing::warn!(%error, "cannot watch the flows; reload with SIGHUP");
                return;
            }
        };
        for folder in folders {
            use notify::Watcher as _;
            if let Err(error) = watcher.watch(folder, notify::RecursiveMode::Recursive) {
                tracing::warn!(folder = %folder.display(), %error, "cannot watch folder");
            }
        }
        let live = Arc::clone(live);
        tokio::spawn(async move {
            let _watcher = watcher; // lives as long as the task
            while changed.recv().await.is_some() {
                // An editor's save is several events: wait for quiet, then reload once.
                while tokio::time::timeout(Duration::from_millis(300), changed.recv())
                    .await
                    .is_ok_and(|e| e.is_some())
                {}
                tracing::info!("flows changed: reloading");
                live.reload_and_log();
            }
        });
    }
}
