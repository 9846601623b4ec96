//! Downloading a module over HTTPS (or HTTP where allowed) with reqwest on
//! rustls, into memory with a size limit.

use std::time::Duration;

use super::{AttemptError, FetchError, error_chain, tls_error};

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;

pub(super) fn client(
    extra_roots: Option<Vec<reqwest::Certificate>>,
    timeout: Duration,
    allow_http: bool,
) -> Result<reqwest::Client, FetchError> {
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.url().scheme() == "http" && !allow_http {
            // A redirect must not downgrade to plain text either.
            let message = format!(
                "redirected to {}, a plain http:// URL, which `modules.allow_http` does not allow",
                attempt.url()
            );
            attempt.error(message)
        } else if attempt.previous().len() >= MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else {
            attempt.follow()
        }
    });
    let mut builder = reqwest::Client::builder()
        .redirect(redirects)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("wisp/", env!("CARGO_PKG_VERSION")));
    if let Some(roots) = extra_roots {
        builder = builder.tls_certs_merge(roots);
    }
    builder.build().map_err(|e| FetchError::Client {
        what: "HTTPS",
        reason: error_chain(&e),
    })
}

pub(super) async fn download(
    client: &reqwest::Client,
    url: &reqwest::Url,
    max_bytes: u64,
    origin: &str,
) -> Result<Vec<u8>, AttemptError> {
    let mut response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| classify(origin, &e))?;
    let status = response.status();
    if !status.is_success() {
        let reason = format!("the server answered {status}");
        // 5xx, 429 and 408 may pass; any other answer will not change.
        return Err(
            if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                AttemptError::transient(origin, reason)
            } else {
                AttemptError::permanent(FetchError::HttpStatus {
                    url: origin.to_owned(),
                    status: status.as_u16(),
                })
            },
        );
    }
    let too_large = || {
        AttemptError::permanent(FetchError::TooLarge {
            url: origin.to_owned(),
            limit: max_bytes,
        })
    };
    if response.content_length().is_some_and(|len| len > max_bytes) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| classify(origin, &e))? {
        if (bytes.len() + chunk.len()) as u64 > max_bytes {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Connect errors, timeouts and broken bodies may pass; a refused
/// certificate, a bad redirect or a bad URL will not.
pub(super) fn classify(origin: &str, error: &reqwest::Error) -> AttemptError {
    if let Some(reason) = tls_error(error) {
        return AttemptError::permanent(FetchError::Tls {
            url: origin.to_owned(),
            reason,
        });
    }
    if error.is_redirect() || error.is_builder() {
        return AttemptError::permanent(FetchError::Refused {
            url: origin.to_owned(),
            reason: error_chain(error),
        });
    }
    AttemptError::transient(origin, error_chain(error))
}
