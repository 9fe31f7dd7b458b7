//! http and https probes; the https server uses a certificate for `backend.example`
//! issued by a test CA.

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

use super::*;

fn http(change: impl FnOnce(&mut HttpProbe)) -> HttpProbe {
    let mut probe = HttpProbe::default();
    change(&mut probe);
    probe
}

#[tokio::test]
async fn http_status_in_range_succeeds() {
    let reply = HttpReply::new(200, "all good");
    let server = http_server(reply.clone()).await;
    probe(ProbeKind::Http(HttpProbe::default()), server)
        .await
        .unwrap();
    let request = reply.last_request();
    assert!(request.starts_with("GET / HTTP/1.1\r\n"), "{request}");
    assert!(
        request
            .to_lowercase()
            .contains(&format!("host: {server}\r\n")),
        "the default Host is the target: {request}"
    );
}

#[tokio::test]
async fn http_path_host_and_body() {
    let reply = HttpReply::new(202, "status: ok");
    let server = http_server(reply.clone()).await;
    let kind = ProbeKind::Http(http(|h| {
        h.path = "/healthz?full=1".to_string();
        h.host = Some("www.example.com".to_string());
        h.body_contains = Some("ok".to_string());
    }));
    probe(kind, server).await.unwrap();
    let request = reply.last_request().to_lowercase();
    assert!(
        request.starts_with("get /healthz?full=1 http/1.1\r\n"),
        "{request}"
    );
    assert!(request.contains("host: www.example.com\r\n"), "{request}");
}

#[tokio::test]
async fn http_server_error_fails() {
    let server = http_server(HttpReply::new(500, "oops")).await;
    let err = probe(ProbeKind::Http(HttpProbe::default()), server)
        .await
        .unwrap_err();
    assert_eq!(err, "http: status 500, expected 200-399");
}

#[tokio::test]
async fn http_body_mismatch_fails() {
    let server = http_server(HttpReply::new(200, "degraded")).await;
    let kind = ProbeKind::Http(http(|h| h.body_contains = Some("ok".to_string())));
    let err = probe(kind, server).await.unwrap_err();
    assert_eq!(err, "http: the body does not contain \"ok\"");
}

#[tokio::test]
async fn http_status_range_is_configurable() {
    let server = http_server(HttpReply::new(404, "")).await;
    let exactly = |low, high| ProbeKind::Http(http(|h| h.expect_status = (low, high)));
    probe(exactly(404, 404), server).await.unwrap();
    probe(exactly(400, 499), server).await.unwrap();
    let err = probe(exactly(200, 204), server).await.unwrap_err();
    assert_eq!(err, "http: status 404, expected 200-204");
    let err = probe(exactly(200, 200), server).await.unwrap_err();
    assert_eq!(err, "http: status 404, expected 200");
}

#[tokio::test]
async fn http_closed_port_fails() {
    let err = probe(ProbeKind::Http(HttpProbe::default()), closed_port().await)
        .await
        .unwrap_err();
    assert!(err.starts_with("http: GET http://127.0.0.1:"), "{err}");
}

/// A test CA's certificate (PEM) and an HTTPS server on 127.0.0.1 with a certificate
/// for `backend.example` issued by it.
async fn https_server(reply: HttpReply) -> (String, SocketAddr) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lb test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["backend.example".to_string()]).unwrap();
    let cert = params
        .signed_by(&key, &rcgen::Issuer::new(ca_params, ca_key))
        .unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, reply) = (acceptor.clone(), reply.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    answer(tls, reply).await;
                }
            });
        }
    });
    (ca_cert.pem(), addr)
}

#[tokio::test]
async fn https_verified_with_ca_file_and_sni() {
    let reply = HttpReply::new(200, "ok");
    let (ca, server) = https_server(reply.clone()).await;
    let ca_file = temp_path("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let verified = |sni: &str| {
        ProbeKind::Https(http(|h| {
            h.sni = Some(sni.to_string());
            h.ca_file = Some(ca_file.clone());
            h.body_contains = Some("ok".to_string());
        }))
    };
    let result = probe(verified("backend.example"), server).await;
    let wrong_name = probe(verified("wrong.example"), server).await;
    // Without `sni`, a `host` name is the server name.
    let by_host = ProbeKind::Https(http(|h| {
        h.host = Some("backend.example".to_string());
        h.ca_file = Some(ca_file.clone());
    }));
    let by_host = probe(by_host, server).await;
    let _ = std::fs::remove_file(&ca_file);
    result.unwrap();
    let request = reply.requests.lock().unwrap()[0].to_lowercase();
    assert!(
        request.contains(&format!("host: {server}\r\n")),
        "the Host header is still the target: {request}"
    );
    let err = wrong_name.unwrap_err();
    assert!(
        err.starts_with("https: GET https://wrong.example:"),
        "{err}"
    );
    by_host.unwrap();
    assert!(
        reply
            .last_request()
            .to_lowercase()
            .contains("host: backend.example\r\n")
    );
}

#[tokio::test]
async fn https_verification_fails_without_the_ca() {
    let (_, server) = https_server(HttpReply::new(200, "ok")).await;
    let kind = ProbeKind::Https(http(|h| h.sni = Some("backend.example".to_string())));
    probe(kind, server).await.unwrap_err();
    let missing = ProbeKind::Https(http(|h| h.ca_file = Some(temp_path("missing.pem"))));
    let err = probe(missing, server).await.unwrap_err();
    assert!(err.starts_with("https: cannot read ca_file "), "{err}");
}

#[tokio::test]
async fn https_without_verification() {
    let (_, server) = https_server(HttpReply::new(200, "ok")).await;
    let kind = ProbeKind::Https(http(|h| h.verify_tls = false));
    probe(kind, server).await.unwrap();
    let status = ProbeKind::Https(http(|h| {
        h.verify_tls = false;
        h.expect_status = (201, 201);
    }));
    assert_eq!(
        probe(status, server).await.unwrap_err(),
        "https: status 200, expected 201"
    );
}
