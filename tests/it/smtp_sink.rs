//! An in-process SMTP server for the tests: it accepts every message (plain SMTP on
//! loopback) and keeps it. `fail_next` makes it answer `451` to that many MAIL FROMs.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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

pub struct Sink {
    pub port: u16,
    pub mails: Mutex<Vec<Mail>>,
    pub fail_next: AtomicUsize,
}

impl Sink {
    pub async fn start() -> Arc<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink = Arc::new(Sink {
            port: listener.local_addr().unwrap().port(),
            mails: Mutex::new(Vec::new()),
            fail_next: AtomicUsize::new(0),
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
        let (r, mut w) = conn.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"220 sink ready\r\n").await?;
        let mut to = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let upper = line.to_ascii_uppercase();
            if upper.starts_with("EHLO") {
                w.write_all(b"250-sink\r\n250 8BITMIME\r\n").await?;
            } else if upper.starts_with("MAIL FROM") {
                let fail = self
                    .fail_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if fail {
                    w.write_all(b"451 try again later\r\n").await?;
                } else {
                    w.write_all(b"250 ok\r\n").await?;
                }
            } else if upper.starts_with("RCPT TO") {
                to = line
                    .trim()
                    .trim_start_matches("RCPT TO:<")
                    .trim_end_matches('>')
                    .to_owned();
                w.write_all(b"250 ok\r\n").await?;
            } else if upper.starts_with("DATA") {
                w.write_all(b"354 go ahead\r\n").await?;
                let mut data = String::new();
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).await? == 0 {
                        return Ok(());
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
                w.write_all(b"250 queued\r\n").await?;
            } else if upper.starts_with("QUIT") {
                w.write_all(b"221 bye\r\n").await?;
                return Ok(());
            } else {
                w.write_all(b"502 not here\r\n").await?;
            }
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
