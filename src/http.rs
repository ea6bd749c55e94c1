//! HTTP clients for URLs a user names (box and catalog downloads, the load generator): ureq over native-tls, the
//! one TLS stack of the binary (OpenSSL on Unix, as ssh2 links it; SChannel on Windows). The probes of the tool's own
//! forwarded ports are plain HTTP and build their agents without TLS.

use std::sync::Arc;

use anyhow::{Context, Result};

/// An agent builder that can speak HTTPS, trusting the system's certificate store (on Unix OpenSSL's, which
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` override).
pub(crate) fn agent() -> Result<ureq::AgentBuilder> {
    let tls = native_tls::TlsConnector::new().context(
        "cannot set up TLS for HTTPS downloads\nhint: check the system's OpenSSL configuration and certificate \
         store (package ca-certificates), or SSL_CERT_FILE / SSL_CERT_DIR if set",
    )?;
    Ok(ureq::AgentBuilder::new().tls_connector(Arc::new(tls)))
}

/// Whether a failed request failed on the server's certificate (a retry cannot help).
pub(crate) fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if s.contains("certificate verify failed") || s.contains("certificate") && s.contains("untrusted") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// What to do when the server's certificate is not trusted.
pub(crate) const CERTIFICATE_HINT: &str = crate::platform::CERTIFICATE_HINT;
