//! An in-process SMTP server for the tests: it accepts every message (plain SMTP on
//! loopback) and keeps it. `fail_next` makes it answer `451` to that many MAIL FROMs.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Mail {
    pub to: String,
    pub data: String,
}

impl Mail {
    pub fn subject(&self) -> &str {
        self.data
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .unwrap_or("")
    }

    /// The path of the first link to this server in the body (`/accounts/...`).
    pub fn link(&self) -> String {
        let at = self
            .data
            .find("/accounts/")
            .unwrap_or_else(|| panic!("no link in {}", self.data));
        self.data[at..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    }

    pub fn token(&self) -> String {
        self.link().rsplit('/').next().unwrap().to_owned()
    }
}

/// How the sink speaks.
#[derive(Clone)]
pub enum Mode {
    Plain,
    /// Offers STARTTLS and upgrades with this acceptor.
    Starttls(tokio_rustls::TlsAcceptor),
    /// TLS from the first byte.
    Implicit(tokio_rustls::TlsAcceptor),
}

enum Next {
    Done,
    Upgrade,
}

pub struct Sink {
    pub port: u16,
    pub mails: Mutex<Vec<Mail>>,
    pub fail_next: AtomicUsize,
    /// AUTH PLAIN credentials received, with whether the connection was TLS then.
    pub auths: Mutex<Vec<(String, bool)>>,
    mode: Mode,
}

/// A TLS acceptor for `localhost` with a fresh self-signed certificate, and that
/// certificate as PEM (for `mail.smtp_ca_file`).
pub fn tls_for_localhost() -> (tokio_rustls::TlsAcceptor, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let pem = cert.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), pem)
}

impl Sink {
    pub async fn start() -> Arc<Sink> {
        Self::start_with(Mode::Plain).await
    }

    pub async fn start_with(mode: Mode) -> Arc<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink = Arc::new(Sink {
            port: listener.local_addr().unwrap().port(),
            mails: Mutex::new(Vec::new()),
            fail_next: AtomicUsize::new(0),
            auths: Mutex::new(Vec::new()),
            mode,
        });
        let s = sink.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = s.session(conn).await;
                });
            }
        });
        sink
    }

    async fn session(&self, conn: tokio::net::TcpStream) -> std::io::Result<()> {
        match self.mode.clone() {
            Mode::Plain => {
                let mut c = BufStream::new(conn);
                c.write_all(b"220 sink ready\r\n").await?;
                c.flush().await?;
                self.dialog(&mut c, false, false).await.map(|_| ())
            }
            Mode::Implicit(acceptor) => {
                let tls = acceptor.accept(conn).await?;
                let mut c = BufStream::new(tls);
                c.write_all(b"220 sink ready\r\n").await?;
                c.flush().await?;
                self.dialog(&mut c, false, true).await.map(|_| ())
            }
            Mode::Starttls(acceptor) => {
                let mut c = BufStream::new(conn);
                c.write_all(b"220 sink ready\r\n").await?;
                c.flush().await?;
                if let Next::Upgrade = self.dialog(&mut c, true, false).await? {
                    let tls = acceptor.accept(c.into_inner()).await?;
                    let mut c = BufStream::new(tls);
                    self.dialog(&mut c, false, true).await?;
                }
                Ok(())
            }
        }
    }

    async fn dialog<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        c: &mut BufStream<S>,
        offer_starttls: bool,
        tls: bool,
    ) -> std::io::Result<Next> {
        let mut to = String::new();
        loop {
            let mut line = String::new();
            if c.read_line(&mut line).await? == 0 {
                return Ok(Next::Done);
            }
            let upper = line.to_ascii_uppercase();
            if upper.starts_with("EHLO") {
                if offer_starttls {
                    c.write_all(b"250-sink\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n")
                        .await?;
                } else {
                    c.write_all(b"250-sink\r\n250 AUTH PLAIN\r\n").await?;
                }
            } else if upper.starts_with("STARTTLS") && offer_starttls {
                c.write_all(b"220 go ahead\r\n").await?;
                c.flush().await?;
                return Ok(Next::Upgrade);
            } else if upper.starts_with("AUTH PLAIN ") {
                let b64 = line.trim()["AUTH PLAIN ".len()..].to_owned();
                let raw = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
                    .unwrap_or_default();
                self.auths
                    .lock()
                    .unwrap()
                    .push((String::from_utf8_lossy(&raw).into_owned(), tls));
                c.write_all(b"235 ok\r\n").await?;
            } else if upper.starts_with("MAIL FROM") {
                let fail = self
                    .fail_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if fail {
                    c.write_all(b"451 try again later\r\n").await?;
                } else {
                    c.write_all(b"250 ok\r\n").await?;
                }
            } else if upper.starts_with("RCPT TO") {
                to = line
                    .trim()
                    .trim_start_matches("RCPT TO:<")
                    .trim_end_matches('>')
                    .to_owned();
                c.write_all(b"250 ok\r\n").await?;
            } else if upper.starts_with("DATA") {
                c.write_all(b"354 go ahead\r\n").await?;
                c.flush().await?;
                let mut data = String::new();
                loop {
                    let mut l = String::new();
                    if c.read_line(&mut l).await? == 0 {
                        return Ok(Next::Done);
                    }
                    if l == ".\r\n" {
                        break;
                    }
                    data.push_str(l.strip_prefix('.').unwrap_or(&l));
                }
                self.mails.lock().unwrap().push(Mail {
                    to: to.clone(),
                    data,
                });
                c.write_all(b"250 queued\r\n").await?;
            } else if upper.starts_with("QUIT") {
                c.write_all(b"221 bye\r\n").await?;
                c.flush().await?;
                return Ok(Next::Done);
            } else {
                c.write_all(b"502 not here\r\n").await?;
            }
            c.flush().await?;
        }
    }

    pub fn count(&self) -> usize {
        self.mails.lock().unwrap().len()
    }

    /// Waits (up to 10 s) for mail number `n` (0-based) and answers it.
    pub async fn wait_for(&self, n: usize) -> Mail {
        for _ in 0..200 {
            if let Some(m) = self.mails.lock().unwrap().get(n) {
                return m.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("mail {n} never arrived ({} so far)", self.count());
    }
}
