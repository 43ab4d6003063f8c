//! Direct TLS (rustls) for the proxy-to-server hop, when `DS_TLS__CERT_PATH` and
//! `DS_TLS__KEY_PATH` are set. ALPN offers HTTP/2 and HTTP/1.1.
//!
//! The accept loop owns each connection's task; at shutdown it stops accepting and asks every
//! connection to finish gracefully (the caller bounds how long that may take). Connections are
//! counted against `DS_SERVER__MAX_CONNECTIONS` with the plaintext ones (`http::edge`).

use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::Handler;
use crate::http::edge::{self, Acceptor, Admission, EdgeLimits};

/// Builds the TLS acceptor from PEM files, with a message naming the file on any problem.
pub fn acceptor(cert_path: &Path, key_path: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| anyhow::anyhow!("DS_TLS__CERT_PATH {}: {e}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("DS_TLS__CERT_PATH {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "DS_TLS__CERT_PATH {}: no certificate found",
            cert_path.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| anyhow::anyhow!("DS_TLS__KEY_PATH {}: {e}", key_path.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            anyhow::anyhow!("DS_TLS__CERT_PATH/DS_TLS__KEY_PATH do not form a usable pair: {e}")
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `handler` over TLS until `stop` is cancelled, then waits for open connections to
/// finish their current requests (the caller bounds how long). Handshakes get
/// `DS_SERVER__HEADER_READ_TIMEOUT`; connections are served under [`edge::serve_hyper`]'s bounds.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handler: Handler,
    stop: CancellationToken,
    limits: EdgeLimits,
    admission: Arc<Admission>,
) {
    let tracker = TaskTracker::new();
    let limits = Arc::new(limits);
    let mut incoming = Acceptor::new(listener, admission, None);
    while let Some((tcp, peer, admitted)) = incoming.next(&stop).await {
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let limits = limits.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let _admitted = admitted;
            let tls = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "tls handshake timed out");
                    return;
                }
            };
            if let Err(e) = edge::serve_hyper(tls, handler, &limits, &stop).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}
