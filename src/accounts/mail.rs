//! Outgoing mail: a small SMTP client (STARTTLS or implicit TLS with rustls, AUTH PLAIN),
//! a folder "mailer" for dev, and the durable outbox that sends each queued mail at most
//! once.
//!
//! Mails never carry PHI: only the account's username, a role name, a time and a
//! single-use link. Nothing of a mail (address, subject, link) reaches a log line, except
//! in dev without SMTP, where the subject is logged when the mail is written to a file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

use crate::clock::{SharedClock, timestamp};
use crate::config::{Config, Environment, Secret, SmtpTls};
use crate::crypto::{self, SharedKeyring};
use crate::store::{Db, StoreError};

const BODY_PURPOSE: &str = "custodian/mail/body/v1";

/// How a send ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Not delivered, and safe to try again (connection, timeout, 4xx before the end of
    /// the message).
    Transient(String),
    /// Refused for good (5xx), or misconfigured.
    Permanent(String),
    /// The message was sent but the server's answer never came: it may have been
    /// delivered, so it is not sent again.
    Unknown(String),
}

impl SendError {
    fn text(&self) -> &str {
        match self {
            SendError::Transient(s) | SendError::Permanent(s) | SendError::Unknown(s) => s,
        }
    }
}

/// A mail ready to go.
pub struct Message<'a> {
    pub to: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    pub date: &'a str,
    pub id: &'a str,
}

/// Where mails go.
pub enum Mailer {
    Smtp(Box<Smtp>),
    /// Dev: one `.eml` file per mail in this folder.
    Folder(PathBuf),
    /// Staging/prod without SMTP: nothing can be sent.
    Off,
}

pub struct Smtp {
    host: String,
    port: u16,
    tls: SmtpTls,
    username: Option<String>,
    password: Option<Secret>,
    from_header: String,
    from_addr: String,
    timeout: Duration,
    connector: tokio_rustls::TlsConnector,
}

/// The address inside `Name <addr>`, or the whole text.
pub fn address_of(from: &str) -> &str {
    match (from.rfind('<'), from.rfind('>')) {
        (Some(a), Some(b)) if a < b => &from[a + 1..b],
        _ => from.trim(),
    }
}

fn clean_header(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

impl Mailer {
    pub fn from_config(c: &Config, password: Option<Secret>) -> anyhow::Result<Self> {
        let Some(host) = &c.mail.smtp_host else {
            return Ok(if c.env == Environment::Dev {
                Mailer::Folder(
                    c.mail
                        .folder
                        .clone()
                        .unwrap_or_else(|| c.data_dir.join("mail")),
                )
            } else {
                Mailer::Off
            });
        };
        if c.mail.smtp_tls == SmtpTls::None && !is_loopback(host) {
            anyhow::bail!(
                "mail.smtp_tls: none is allowed only to a server on this machine, not {host}"
            );
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = &c.mail.smtp_ca_file {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("mail.smtp_ca_file {}: {e}", ca.display()))?;
            if certs.is_empty() {
                anyhow::bail!("mail.smtp_ca_file {}: no certificate in it", ca.display());
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| anyhow::anyhow!("mail.smtp_ca_file {}: {e}", ca.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Mailer::Smtp(Box::new(Smtp {
            host: host.clone(),
            port: c.mail.smtp_port,
            tls: c.mail.smtp_tls,
            username: c.mail.smtp_username.clone(),
            password,
            from_header: clean_header(&c.mail.from),
            from_addr: clean_header(address_of(&c.mail.from)),
            timeout: c.mail.timeout.std(),
            connector: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        })))
    }

    pub fn can_send(&self) -> bool {
        !matches!(self, Mailer::Off)
    }

    pub async fn send(&self, m: &Message<'_>) -> Result<(), SendError> {
        match self {
            Mailer::Off => Err(SendError::Permanent("no SMTP server is configured".into())),
            Mailer::Folder(dir) => write_to_folder(dir, m),
            Mailer::Smtp(s) => match tokio::time::timeout(s.timeout, s.send(m)).await {
                Ok(r) => r,
                Err(_) => Err(SendError::Transient("SMTP conversation timed out".into())),
            },
        }
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn rfc822(from: &str, m: &Message<'_>) -> String {
    let mut out = format!(
        "From: {from}\r\nTo: <{}>\r\nSubject: {}\r\nDate: {}\r\nMessage-ID: <{}@custodian>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\nAuto-Submitted: auto-generated\r\n\r\n",
        clean_header(m.to),
        clean_header(m.subject),
        clean_header(m.date),
        clean_header(m.id),
    );
    for line in m.body.lines() {
        // Dot-stuffing (RFC 5321 §4.5.2).
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out
}

fn write_to_folder(dir: &std::path::Path, m: &Message<'_>) -> Result<(), SendError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail =
        |e: std::io::Error| SendError::Transient(format!("cannot write the mail folder: {e}"));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let name = dir.join(format!("{}.eml", m.id));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&name)
        .map_err(fail)?;
    f.write_all(rfc822("Custodian <no-reply@localhost>", m).as_bytes())
        .map_err(fail)?;
    tracing::info!(subject = m.subject, folder = %dir.display(), "dev: mail written to the mail folder instead of sent");
    Ok(())
}

async fn reply<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut BufStream<S>,
) -> Result<(u16, Vec<String>), SendError> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = c
            .read_line(&mut line)
            .await
            .map_err(|e| SendError::Transient(format!("SMTP read: {e}")))?;
        if n == 0 || line.len() < 4 {
            return Err(SendError::Transient("SMTP connection closed".into()));
        }
        let code: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| SendError::Transient("SMTP reply malformed".into()))?;
        let more = line.as_bytes().get(3) == Some(&b'-');
        lines.push(line.get(4..).unwrap_or("").trim().to_owned());
        if !more {
            return Ok((code, lines));
        }
        if lines.len() > 100 {
            return Err(SendError::Transient("SMTP reply too long".into()));
        }
    }
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut BufStream<S>,
    line: &str,
    step: &str,
    want: &[u16],
) -> Result<Vec<String>, SendError> {
    let mut bytes = line.as_bytes().to_vec();
    bytes.extend_from_slice(b"\r\n");
    c.write_all(&bytes)
        .await
        .map_err(|e| SendError::Transient(format!("SMTP write at {step}: {e}")))?;
    c.flush()
        .await
        .map_err(|e| SendError::Transient(format!("SMTP write at {step}: {e}")))?;
    expect(c, step, want).await
}

async fn expect<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut BufStream<S>,
    step: &str,
    want: &[u16],
) -> Result<Vec<String>, SendError> {
    let (code, lines) = reply(c).await?;
    if want.contains(&code) {
        Ok(lines)
    } else if (400..500).contains(&code) {
        // The server's text may name the recipient: only the code is kept.
        Err(SendError::Transient(format!("SMTP {code} at {step}")))
    } else {
        Err(SendError::Permanent(format!("SMTP {code} at {step}")))
    }
}

impl Smtp {
    async fn tls(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, SendError> {
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|_| SendError::Permanent("mail.smtp_host is not a valid name".into()))?;
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| SendError::Transient(format!("TLS to the SMTP server: {e}")))
    }

    async fn send(&self, m: &Message<'_>) -> Result<(), SendError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| SendError::Transient(format!("cannot connect to the SMTP server: {e}")))?;
        match self.tls {
            SmtpTls::Implicit => {
                let mut c = BufStream::new(self.tls(tcp).await?);
                expect(&mut c, "greeting", &[220]).await?;
                let ext = command(&mut c, "EHLO custodian", "EHLO", &[250]).await?;
                self.transaction(&mut c, &ext, m).await
            }
            SmtpTls::Starttls => {
                let mut c = BufStream::new(tcp);
                expect(&mut c, "greeting", &[220]).await?;
                let ext = command(&mut c, "EHLO custodian", "EHLO", &[250]).await?;
                if !ext.iter().any(|l| l.eq_ignore_ascii_case("STARTTLS")) {
                    return Err(SendError::Permanent(
                        "the SMTP server does not offer STARTTLS (mail.smtp_tls: starttls)".into(),
                    ));
                }
                command(&mut c, "STARTTLS", "STARTTLS", &[220]).await?;
                let mut c = BufStream::new(self.tls(c.into_inner()).await?);
                let ext = command(&mut c, "EHLO custodian", "EHLO", &[250]).await?;
                self.transaction(&mut c, &ext, m).await
            }
            SmtpTls::None => {
                let mut c = BufStream::new(tcp);
                expect(&mut c, "greeting", &[220]).await?;
                let ext = command(&mut c, "EHLO custodian", "EHLO", &[250]).await?;
                self.transaction(&mut c, &ext, m).await
            }
        }
    }

    async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        c: &mut BufStream<S>,
        ext: &[String],
        m: &Message<'_>,
    ) -> Result<(), SendError> {
        if let (Some(user), Some(pw)) = (&self.username, &self.password) {
            if !ext
                .iter()
                .any(|l| l.to_ascii_uppercase().starts_with("AUTH"))
            {
                return Err(SendError::Permanent(
                    "the SMTP server offers no AUTH".into(),
                ));
            }
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("\0{user}\0{}", pw.expose()));
            command(c, &format!("AUTH PLAIN {token}"), "AUTH", &[235]).await?;
        }
        command(
            c,
            &format!("MAIL FROM:<{}>", self.from_addr),
            "MAIL FROM",
            &[250],
        )
        .await?;
        command(
            c,
            &format!("RCPT TO:<{}>", clean_header(m.to)),
            "RCPT TO",
            &[250, 251],
        )
        .await?;
        command(c, "DATA", "DATA", &[354]).await?;
        let mut data = rfc822(&self.from_header, m).into_bytes();
        data.extend_from_slice(b".\r\n");
        c.write_all(&data)
            .await
            .map_err(|e| SendError::Transient(format!("SMTP write of the message: {e}")))?;
        c.flush()
            .await
            .map_err(|e| SendError::Transient(format!("SMTP write of the message: {e}")))?;
        // From here on the server may have accepted the message.
        match expect(c, "end of data", &[250]).await {
            Ok(_) => {}
            Err(SendError::Transient(t)) if t.starts_with("SMTP 4") => {
                return Err(SendError::Transient(t));
            }
            Err(SendError::Permanent(t)) => return Err(SendError::Permanent(t)),
            Err(e) => return Err(SendError::Unknown(e.text().to_owned())),
        }
        let _ = command(c, "QUIT", "QUIT", &[221]).await;
        Ok(())
    }
}

// ---- the outbox ------------------------------------------------------------------------------

/// The durable queue of mails, and its sender task.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    keys: Arc<SharedKeyring>,
    clock: SharedClock,
    mailer: Mailer,
    notify: tokio::sync::Notify,
    max_attempts: u32,
    poll: Duration,
    stale_claim: Duration,
}

fn seal(keys: &SharedKeyring, id: &str, body: &str) -> Result<String, crypto::CryptoError> {
    crypto::seal(keys, BODY_PURPOSE, id.as_bytes(), body.as_bytes())
}

impl Outbox {
    pub fn new(
        c: &Config,
        password: Option<Secret>,
        db: Db,
        keys: Arc<SharedKeyring>,
        clock: SharedClock,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                keys,
                clock,
                mailer: Mailer::from_config(c, password)?,
                notify: tokio::sync::Notify::new(),
                max_attempts: c.mail.max_attempts.max(1),
                poll: c.mail.poll_interval.std().max(Duration::from_millis(100)),
                stale_claim: c.mail.timeout.std() * 2 + Duration::from_secs(60),
            }),
        })
    }

    pub fn can_send(&self) -> bool {
        self.inner.mailer.can_send()
    }

    /// Queues a mail (durably) and wakes the sender.
    pub async fn enqueue(&self, to: &str, subject: &str, body: &str) -> Result<(), StoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        let sealed = seal(&self.inner.keys, &id, body)
            .map_err(|e| StoreError::Config(format!("cannot seal a mail: {e}")))?;
        let now = timestamp(self.inner.clock.now());
        sqlx::query(
            "INSERT INTO mail_outbox (id, recipient, subject, body, created_at, attempts, next_attempt_at) \
             VALUES ($1, $2, $3, $4, $5, 0, $5)",
        )
        .bind(&id)
        .bind(to)
        .bind(subject)
        .bind(&sealed)
        .bind(&now)
        .execute(self.inner.db.writer())
        .await?;
        self.inner.notify.notify_one();
        Ok(())
    }

    /// Starts the sender task (one per process; rows are claimed, so several processes
    /// share one outbox safely).
    pub fn spawn(&self) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = me.deliver_due().await {
                    tracing::warn!(error = %e, "mail outbox: could not read the queue; retrying");
                }
                tokio::select! {
                    () = me.inner.notify.notified() => {}
                    () = tokio::time::sleep(me.inner.poll) => {}
                }
            }
        });
    }

    /// Sends what is due. Answers how many mails were sent.
    pub async fn deliver_due(&self) -> Result<usize, StoreError> {
        use sqlx::Row;
        let i = &self.inner;
        let now_t = i.clock.now();
        let now = timestamp(now_t);
        // Claims left by a process that stopped mid-send: never sent again.
        let stale = timestamp(now_t - i.stale_claim);
        sqlx::query(
            "UPDATE mail_outbox SET failed_at = $1, last_error = 'interrupted while sending; not sent again (at most once)' \
             WHERE sent_at IS NULL AND failed_at IS NULL AND claimed_at IS NOT NULL AND claimed_at < $2",
        )
        .bind(&now)
        .bind(&stale)
        .execute(i.db.writer())
        .await?;
        let due = sqlx::query(
            "SELECT id, recipient, subject, body, attempts FROM mail_outbox \
             WHERE sent_at IS NULL AND failed_at IS NULL AND claimed_at IS NULL AND next_attempt_at <= $1 \
             ORDER BY next_attempt_at LIMIT 20",
        )
        .bind(&now)
        .fetch_all(i.db.reader())
        .await?;
        let mut sent = 0;
        for row in due {
            let id: String = row.try_get("id")?;
            let claimed = sqlx::query(
                "UPDATE mail_outbox SET claimed_at = $1, attempts = attempts + 1 \
                 WHERE id = $2 AND claimed_at IS NULL AND sent_at IS NULL AND failed_at IS NULL",
            )
            .bind(&now)
            .bind(&id)
            .execute(i.db.writer())
            .await?
            .rows_affected();
            if claimed != 1 {
                continue;
            }
            let to: String = row.try_get("recipient")?;
            let subject: String = row.try_get("subject")?;
            let sealed: String = row.try_get("body")?;
            let attempts = row.try_get::<i64, _>("attempts")? + 1;
            let body = crypto::open(&i.keys, BODY_PURPOSE, id.as_bytes(), &sealed)
                .ok()
                .and_then(|b| String::from_utf8(b.to_vec()).ok());
            let result = match &body {
                Some(b) => {
                    i.mailer
                        .send(&Message {
                            to: &to,
                            subject: &subject,
                            body: b,
                            date: &time_rfc2822(i.clock.now()),
                            id: &id,
                        })
                        .await
                }
                None => Err(SendError::Permanent("the sealed body does not open".into())),
            };
            let done = timestamp(i.clock.now());
            match result {
                Ok(()) => {
                    sent += 1;
                    sqlx::query("UPDATE mail_outbox SET sent_at = $1 WHERE id = $2")
                        .bind(&done)
                        .bind(&id)
                        .execute(i.db.writer())
                        .await?;
                }
                Err(SendError::Transient(e)) if attempts < i64::from(i.max_attempts) => {
                    let wait = Duration::from_secs(
                        30 * 2u64.saturating_pow(u32::try_from(attempts).unwrap_or(10).min(7)),
                    );
                    tracing::warn!(error = %e, attempts, "mail not sent; it will be tried again");
                    sqlx::query(
                        "UPDATE mail_outbox SET claimed_at = NULL, last_error = $1, next_attempt_at = $2 WHERE id = $3",
                    )
                    .bind(&e)
                    .bind(timestamp(i.clock.now() + wait))
                    .bind(&id)
                    .execute(i.db.writer())
                    .await?;
                }
                Err(e) => {
                    tracing::error!(
                        error = e.text(),
                        attempts,
                        "mail not sent, and not tried again"
                    );
                    sqlx::query(
                        "UPDATE mail_outbox SET failed_at = $1, last_error = $2 WHERE id = $3",
                    )
                    .bind(&done)
                    .bind(e.text())
                    .bind(&id)
                    .execute(i.db.writer())
                    .await?;
                }
            }
        }
        Ok(sent)
    }
}

fn time_rfc2822(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_dot_stuffed_and_headers_cannot_be_injected() {
        let m = Message {
            to: "a@example.org\r\nBcc: evil@example.org",
            subject: "Hi\r\nBcc: x",
            body: "line\n.dot\nend",
            date: "Mon, 23 Nov 2026 10:00:00 +0000",
            id: "1",
        };
        let text = rfc822("Custodian <n@x>", &m);
        assert!(!text.contains("\r\nBcc:"), "{text}");
        assert!(text.contains("\r\n..dot\r\n"));
        assert_eq!(address_of("Custodian <n@x.org>"), "n@x.org");
        assert_eq!(address_of("n@x.org"), "n@x.org");
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("127.0.0.1") && is_loopback("localhost") && is_loopback("[::1]"));
        assert!(!is_loopback("mail.example.org"));
    }
}
