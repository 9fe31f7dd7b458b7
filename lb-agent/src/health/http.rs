//! HTTP and HTTPS probes: a GET with a chosen `Host` header and TLS server name, sent
//! to a pinned address (reqwest with rustls; no proxy, no redirects, no pooling).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use reqwest::header::{CONNECTION, HOST, HeaderValue};
use reqwest::{Client, Url, redirect};

use super::HttpProbe;
use super::probe::error_chain;

/// The most of a body read when looking for `body_contains`.
const MAX_BODY: usize = 1 << 20;

/// A client and request prepared for one target.
pub(super) struct HttpClient {
    client: Client,
    url: Url,
    host: Option<HeaderValue>,
    expect_status: (u16, u16),
    body_contains: Option<String>,
}

impl HttpClient {
    /// Prepares the probe `http` against `target`. Fails if the CA file cannot be read
    /// or the URL cannot be built.
    pub(super) fn new(
        http: &HttpProbe,
        https: bool,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<HttpClient, String> {
        let scheme = if https { "https" } else { "http" };
        let default_port = if https { 443 } else { 80 };
        let address = match target.ip() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        // The name in the URL is the TLS server name: the `sni`, else a `host` that is a
        // name. The client resolves it to `target`, whatever DNS says.
        let server_name = https
            .then(|| {
                http.sni.clone().or_else(|| {
                    http.host
                        .clone()
                        .filter(|h| h.trim_matches(['[', ']']).parse::<IpAddr>().is_err())
                })
            })
            .flatten();
        let mut builder = Client::builder()
            .no_proxy()
            .redirect(redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(0)
            .user_agent(concat!(
                "lb-agent/",
                env!("CARGO_PKG_VERSION"),
                " health probe"
            ))
            .use_rustls_tls();
        let url_host = match &server_name {
            Some(name) => {
                builder = builder.resolve(name, target);
                name.clone()
            }
            None => address.clone(),
        };
        let url = format!("{scheme}://{url_host}:{}{}", target.port(), http.path);
        let url = Url::parse(&url).map_err(|e| format!("invalid URL {url}: {e}"))?;
        let host = match (&http.host, &server_name) {
            (Some(host), _) => Some(host.clone()),
            // The URL names the server: the Host header still names the target.
            (None, Some(_)) if target.port() == default_port => Some(address),
            (None, Some(_)) => Some(format!("{address}:{}", target.port())),
            (None, None) => None,
        };
        let host = host
            .map(|h| HeaderValue::from_str(&h).map_err(|_| format!("invalid Host header {h:?}")))
            .transpose()?;
        if https {
            builder = tls(builder, http)?;
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))?;
        Ok(HttpClient {
            client,
            url,
            host,
            expect_status: http.expect_status,
            body_contains: http.body_contains.clone(),
        })
    }

    /// One GET: the status must be in range and the body contain the expected text.
    pub(super) async fn get(&self) -> Result<(), String> {
        let mut request = self
            .client
            .get(self.url.clone())
            .header(CONNECTION, "close");
        if let Some(host) = &self.host {
            request = request.header(HOST, host.clone());
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| format!("GET {}: {}", self.url, error_chain(&e)))?;
        let status = response.status().as_u16();
        let (low, high) = self.expect_status;
        if !(low..=high).contains(&status) {
            let range = if low == high {
                low.to_string()
            } else {
                format!("{low}-{high}")
            };
            return Err(format!("status {status}, expected {range}"));
        }
        let Some(needle) = &self.body_contains else {
            return Ok(());
        };
        let mut body = Vec::new();
        while body.len() < MAX_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => return Err(format!("reading the body: {}", error_chain(&e))),
            }
        }
        let needle = needle.as_bytes();
        if needle.is_empty() || body.windows(needle.len()).any(|w| w == needle) {
            Ok(())
        } else {
            Err(format!(
                "the body does not contain {:?}",
                String::from_utf8_lossy(needle)
            ))
        }
    }
}

/// Certificate checking: off, against a CA bundle, or against the webpki roots.
fn tls(
    builder: reqwest::ClientBuilder,
    http: &HttpProbe,
) -> Result<reqwest::ClientBuilder, String> {
    if !http.verify_tls {
        return Ok(builder.danger_accept_invalid_certs(true));
    }
    let Some(path) = &http.ca_file else {
        return Ok(builder);
    };
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("ca_file {}: {}", path.display(), error_chain(&e)))?;
    if certificates.is_empty() {
        return Err(format!(
            "ca_file {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certificates
        .into_iter()
        .fold(builder.tls_built_in_root_certs(false), |b, c| {
            b.add_root_certificate(c)
        }))
}
