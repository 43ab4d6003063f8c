//! TLS with the TEST-ONLY fixtures: clients that trust only the test CA, and the server-side config
//! an in-test upstream uses to stand in for ds-server behind Envoy.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::fixtures;

/// A client that trusts only `fixtures/ca.pem` (not the system roots), so a test cannot pass by
/// reaching something that is not ours.
pub fn client_builder() -> anyhow::Result<reqwest::ClientBuilder> {
    let ca_path = fixtures::path("ca.pem");
    let ca_pem = std::fs::read(&ca_path).with_context(|| format!("read {}", ca_path.display()))?;
    let ca = reqwest::Certificate::from_pem(&ca_pem).context("parse fixtures/ca.pem")?;
    Ok(reqwest::Client::builder()
        .tls_certs_only([ca])
        .connect_timeout(Duration::from_secs(5)))
}

/// [`client_builder`] with a 30 s whole-request timeout: enough for every non-streaming call.
pub fn client() -> anyhow::Result<reqwest::Client> {
    Ok(client_builder()?.timeout(Duration::from_secs(30)).build()?)
}

/// Server config presenting `fixtures/server.pem` (the certificate ds-server uses in e2e), with
/// ALPN h2 and http/1.1 like ds-server.
pub fn upstream_server_config() -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let cert_path = fixtures::path("server.pem");
    let key_path = fixtures::path("server-key.pem");
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("read {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("read {}", key_path.display()))?;
    // Explicit provider (ring, the one the workspace enables for tokio-rustls): reqwest also
    // compiles in aws-lc-rs, and with two providers the builder without one panics.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
