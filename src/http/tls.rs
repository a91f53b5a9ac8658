//! TLS with rustls (ring provider, TLS 1.2 and 1.3 only): certificates from PEM files,
//! or a self-signed certificate generated at start in staging.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Installs ring as the process's rustls provider (once; later calls are no-ops).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls.cert: cannot read certificates from {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("server.tls.key: cannot read a private key from {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("TLS set-up failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
}

/// A server TLS configuration and the SHA-256 fingerprint of its leaf certificate.
pub struct Tls {
    pub config: Arc<ServerConfig>,
    pub fingerprint: String,
    pub self_signed: bool,
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Loads a PEM certificate chain and key.
pub fn from_files(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = certs.first() else {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            reason: "no CERTIFICATE block found".into(),
        });
    };
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(Tls {
        config: server_config(certs, key)?,
        fingerprint,
        self_signed: false,
    })
}

/// A self-signed certificate for `localhost` and the listen address.
pub fn self_signed(extra_names: &[String]) -> Result<Tls, TlsError> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    for n in extra_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let der = cert.der().clone();
    let fingerprint = fingerprint(&der);
    let key = PrivateKeyDer::try_from(signing_key.serialize_der())
        .map_err(|e| TlsError::Generate(e.to_owned()))?;
    Ok(Tls {
        config: server_config(vec![der], key)?,
        fingerprint,
        self_signed: true,
    })
}

/// `AB:CD:…` SHA-256 of a certificate, as browsers show it.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificates_work_and_differ() {
        install_crypto_provider();
        let a = self_signed(&[]).unwrap();
        let b = self_signed(&["custodian.test".into()]).unwrap();
        assert_eq!(a.fingerprint.len(), 32 * 3 - 1);
        assert_ne!(a.fingerprint, b.fingerprint);
        assert!(a.self_signed);
    }

    #[test]
    fn missing_files_are_named() {
        let e = from_files(
            Path::new("/nonexistent/c.pem"),
            Path::new("/nonexistent/k.pem"),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/c.pem"));
    }
}
