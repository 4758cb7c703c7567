//! TLS identities: the certificate and key a server presents, for the HTTP server and the
//! MLLP listeners alike.

use std::sync::Arc;

/// A TLS server configuration presenting the PEM certificate chain `cert` with its `key`.
///
/// # Errors
///
/// When a file cannot be read or holds no usable certificate or key.
pub fn server_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<rustls::ServerConfig> {
    use anyhow::Context as _;
    use rustls_pki_types::pem::PemObject as _;
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("reading certificates from {}", cert.display()))?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key from {}", key.display()))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("the certificate does not match the key")
}
