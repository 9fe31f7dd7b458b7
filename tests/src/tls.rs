//! HTTPS for probe tests: a test CA with one server certificate issued by it, and a
//! TLS server inside a namespace that answers every request with `HTTP/1.0 200 OK`
//! and a fixed body, recording the server name (SNI) each client asked for.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{
    LazyConfigAcceptor,
    rustls::{
        self, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
        server::Acceptor,
    },
};

use crate::netns;

/// A test CA (its certificate in PEM, for a probe's `ca_file`) and a server
/// certificate and key it issued.
pub struct TestPki {
    pub ca_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl TestPki {
    /// A new CA and a certificate for the DNS name `server_name` signed by it.
    pub fn new(server_name: &str) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "lb probe test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign the CA");
        let key = rcgen::KeyPair::generate().expect("server key");
        let params =
            rcgen::CertificateParams::new(vec![server_name.to_string()]).expect("server params");
        let cert = params
            .signed_by(&key, &rcgen::Issuer::new(ca_params, ca_key))
            .expect("issue the server certificate");
        TestPki {
            ca_pem: ca_cert.pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }

    fn server_config(&self) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(self.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .expect("server certificate");
        Arc::new(config)
    }
}

/// A running HTTPS server; stopped (its port closed) on drop.
pub struct TlsServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Per TLS client hello: the server name it asked for (`None`: no SNI).
    snis: Arc<Mutex<Vec<Option<String>>>>,
    /// Requests answered (completed handshakes that sent a request).
    answered: Arc<Mutex<u64>>,
}

impl TlsServer {
    /// The server names of every client hello so far, in order.
    pub fn snis(&self) -> Vec<Option<String>> {
        self.snis.lock().expect("snis").clone()
    }

    /// How many requests got the `200 OK` answer.
    pub fn answered(&self) -> u64 {
        *self.answered.lock().expect("answered")
    }

    /// Stops accepting and closes the port (connections then get a reset).
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts in namespace `ns` an HTTPS server on `addr` (a current-thread Tokio runtime
/// on a thread that entered `ns`) with `pki`'s certificate, answering every request
/// with `HTTP/1.0 200 OK` and `body`. Returns once it listens.
pub fn https_server(ns: &str, addr: SocketAddr, pki: &TestPki, body: &str) -> TlsServer {
    let config = pki.server_config();
    let body = body.to_string();
    let snis = Arc::new(Mutex::new(Vec::new()));
    let answered = Arc::new(Mutex::new(0u64));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (snis2, answered2) = (snis.clone(), answered.clone());
    let thread = netns::spawn_in(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("bind {addr}: {e}")));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let serve = async {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let (config, body, snis, answered) = (config.clone(), body.clone(), snis2.clone(), answered2.clone());
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), async move {
                            let Ok(start) = LazyConfigAcceptor::new(Acceptor::default(), stream).await else { return };
                            let sni = start.client_hello().server_name().map(str::to_string);
                            snis.lock().expect("snis").push(sni);
                            let Ok(mut tls) = start.into_stream(config).await else { return };
                            let mut req = Vec::new();
                            let mut buf = [0u8; 1024];
                            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                                match tls.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => req.extend_from_slice(&buf[..n]),
                                }
                            }
                            let resp = format!(
                                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            if tls.write_all(resp.as_bytes()).await.is_ok() {
                                *answered.lock().expect("answered") += 1;
                            }
                            let _ = tls.shutdown().await;
                        })
                        .await;
                    });
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = stop_rx => {}
            }
            // Leaving the runtime drops the listener and every connection task.
        });
    });
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("HTTPS server in {ns}: {e}"),
        Err(e) => panic!("HTTPS server in {ns} did not start: {e}"),
    }
    TlsServer {
        stop: Some(stop_tx),
        thread: Some(thread),
        snis,
        answered,
    }
}
