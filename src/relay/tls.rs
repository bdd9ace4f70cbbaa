//! Mutual TLS between relays (rustls with the ring provider): each side presents a certificate
//! signed by the relay CA and accepts only a peer whose certificate that CA signed. Guest
//! memory never crosses the wire in clear.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::RelayError;

/// The DNS name relay certificates carry unless told otherwise.
pub const DEFAULT_SERVER_NAME: &str = "commonground-relay";

#[derive(Clone, Debug, clap::Args)]
pub struct TlsArgs {
    /// This relay's certificate chain (PEM).
    #[arg(long, env = "COMMONGROUND_RELAY_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// This relay's private key (PEM).
    #[arg(long, env = "COMMONGROUND_RELAY_TLS_KEY")]
    pub tls_key: PathBuf,
    /// The CA that signs every relay's certificate (PEM); peers must present one it signed.
    #[arg(long, env = "COMMONGROUND_RELAY_TLS_CA")]
    pub tls_ca: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(path: &Path, what: impl std::fmt::Display) -> RelayError {
    RelayError::Tls(format!("{}: {what}", path.display()))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, RelayError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error(path, e))?;
    if certs.is_empty() {
        return Err(tls_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, RelayError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| tls_error(path, e))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, RelayError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots.add(cert).map_err(|e| tls_error(path, e))?;
    }
    Ok(Arc::new(roots))
}

/// The target relay's side: requires a client certificate from the CA.
pub fn server_config(args: &TlsArgs) -> Result<Arc<ServerConfig>, RelayError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&args.tls_ca)?, provider())
        .build()
        .map_err(|e| tls_error(&args.tls_ca, e))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| RelayError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&args.tls_cert)?, key(&args.tls_key)?)
        .map_err(|e| tls_error(&args.tls_cert, e))?;
    Ok(Arc::new(config))
}

/// The source relay's side: presents its certificate, trusts only the CA.
pub fn client_config(args: &TlsArgs) -> Result<Arc<ClientConfig>, RelayError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| RelayError::Tls(e.to_string()))?
        .with_root_certificates(roots(&args.tls_ca)?)
        .with_client_auth_cert(certs(&args.tls_cert)?, key(&args.tls_key)?)
        .map_err(|e| tls_error(&args.tls_cert, e))?;
    Ok(Arc::new(config))
}

pub fn server_name(name: &str) -> Result<ServerName<'static>, RelayError> {
    ServerName::try_from(name.to_string())
        .map_err(|e| RelayError::Tls(format!("server name {name:?}: {e}")))
}
