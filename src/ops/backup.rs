//! Encrypted backups: `custodian backup --to FILE` and `custodian restore --from FILE`.
//!
//! File format (version 1):
//! - one line of JSON in clear: `{"format":"custodian-backup","version":1,"backup_id",
//!   "key_version","created_at","schema_version","source"}` — nothing secret;
//! - then chunks, each `u32` big-endian length + AES-256-GCM(`nonce | ciphertext | tag`)
//!   of up to 1 MiB of the dump (JSON lines, see [`super::dump`]), under the keyring key
//!   `custodian/backup/v1` of `key_version`, with the AAD binding the header's SHA-256,
//!   the chunk's index and whether it is the last. A reordered, dropped, truncated or
//!   altered chunk, or an edited header, fails to open.
//!
//! The keyring is never in the backup: restoring needs the same keyring (back it up on
//! its own, see `docs/deploy.md`). The backup is written to a temporary file (mode 0600)
//! and renamed into place when complete.

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dump::{self, Column, Item, Sink};
use crate::crypto::{self, SharedKeyring};
use crate::store::Db;

const PURPOSE: &str = "custodian/backup/v1";
const CHUNK: usize = 1024 * 1024;
const MAX_SEALED: usize = CHUNK + 4096;

#[derive(Debug, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub backup_id: String,
    pub key_version: u32,
    pub created_at: String,
    pub schema_version: i64,
    pub source: String,
}

fn aad(header_hash: &str, index: u64, last: bool) -> Vec<u8> {
    format!("custodian-backup|{header_hash}|{index}|{}", u8::from(last)).into_bytes()
}

/// The dump lines of the stream.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Table {
        table: String,
        columns: Vec<(String, bool)>,
    },
    Row(Vec<Value>),
    End {
        table: String,
        rows: u64,
    },
}

struct SealedWriter<W: Write> {
    out: W,
    key: crypto::Key,
    header_hash: String,
    index: u64,
    buf: Vec<u8>,
}

impl<W: Write> SealedWriter<W> {
    fn chunk(&mut self, last: bool) -> anyhow::Result<()> {
        let sealed = crypto::aead_seal(
            self.key.bytes(),
            &aad(&self.header_hash, self.index, last),
            &self.buf,
        )?;
        let len = u32::try_from(sealed.len())?;
        self.out.write_all(&len.to_be_bytes())?;
        self.out.write_all(&sealed)?;
        self.index += 1;
        self.buf.clear();
        Ok(())
    }

    fn line(&mut self, line: &Line) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.buf, line)?;
        self.buf.push(b'\n');
        if self.buf.len() >= CHUNK {
            self.chunk(false)?;
        }
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<W> {
        self.chunk(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write + Send> Sink for SealedWriter<W> {
    async fn item(&mut self, item: Item) -> anyhow::Result<()> {
        let line = match item {
            Item::Table { name, columns } => Line::Table {
                table: name,
                columns: columns.into_iter().map(|c| (c.name, c.int)).collect(),
            },
            Item::Row(v) => Line::Row(v),
            Item::EndTable { name, rows } => Line::End { table: name, rows },
        };
        self.line(&line)
    }
}

/// What a backup or restore did.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub backup_id: String,
    pub schema_version: i64,
    pub tables: Vec<(String, u64)>,
}

/// Writes an encrypted backup of `db` to `to` (which must not exist).
pub async fn backup(
    db: &Db,
    keys: &SharedKeyring,
    to: &Path,
    now: &str,
) -> anyhow::Result<Summary> {
    if to.exists() {
        anyhow::bail!("{} exists; choose a new file name", to.display());
    }
    let key_version = keys.current_version();
    let key = keys.derive(key_version, PURPOSE)?;
    let header = Header {
        format: "custodian-backup".into(),
        version: 1,
        backup_id: uuid::Uuid::new_v4().to_string(),
        key_version,
        created_at: now.to_owned(),
        schema_version: dump::schema_version(db).await?,
        source: db.backend().as_str().to_owned(),
    };
    let header_line = serde_json::to_string(&header)?;
    let tmp_path = to.with_extension("partial");
    let tmp = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp_path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", tmp_path.display()))?;
    let result = write_backup(db, key, &header_line, tmp).await;
    let tables = match result {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp_path);
            return Err(e);
        }
    };
    // A hard link does not replace an existing file: the backup never overwrites one.
    let linked = std::fs::hard_link(&tmp_path, to);
    let _ = std::fs::remove_file(&tmp_path);
    linked.map_err(|e| anyhow::anyhow!("cannot create {}: {e}", to.display()))?;
    Ok(Summary {
        backup_id: header.backup_id,
        schema_version: header.schema_version,
        tables,
    })
}

async fn write_backup(
    db: &Db,
    key: crypto::Key,
    header_line: &str,
    file: std::fs::File,
) -> anyhow::Result<Vec<(String, u64)>> {
    let mut file = std::io::BufWriter::new(file);
    file.write_all(header_line.as_bytes())?;
    file.write_all(b"\n")?;
    let mut w = SealedWriter {
        out: file,
        key,
        header_hash: crypto::sha256_hex(header_line.as_bytes()),
        index: 0,
        buf: Vec::with_capacity(CHUNK + 64 * 1024),
    };
    let tables = dump::export(db, &mut w).await?;
    let file = w.finish()?;
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(tables)
}

/// Reads a backup's header (no key needed).
pub fn read_header(r: &mut impl BufRead) -> anyhow::Result<(Header, String)> {
    let mut line = String::new();
    r.take(4096).read_line(&mut line)?;
    let line = line.trim_end_matches('\n').to_owned();
    let header: Header = serde_json::from_str(&line)
        .map_err(|_| anyhow::anyhow!("this is not a Custodian backup (no header)"))?;
    if header.format != "custodian-backup" || header.version != 1 {
        anyhow::bail!(
            "unknown backup format {} version {}",
            header.format,
            header.version
        );
    }
    Ok((header, line))
}

/// Restores a backup into `db` (migrated to the backup's schema version, and empty), in
/// one transaction. Verifies every chunk and every table's row count.
pub async fn restore(db: &Db, keys: &SharedKeyring, from: &Path) -> anyhow::Result<Summary> {
    let file = std::fs::File::open(from)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", from.display()))?;
    let mut r = std::io::BufReader::new(file);
    let (header, header_line) = read_header(&mut r)?;
    let here = dump::schema_version(db).await?;
    if header.schema_version != here {
        anyhow::bail!(
            "the backup is at schema version {}, this database at {here}: restore with the custodian version that made the backup, then upgrade",
            header.schema_version
        );
    }
    let key = keys.derive(header.key_version, PURPOSE).map_err(|_| {
        anyhow::anyhow!(
            "the keyring has no key version {}: restore needs the keyring the backup was made with",
            header.key_version
        )
    })?;
    let header_hash = crypto::sha256_hex(header_line.as_bytes());
    let mut loader = dump::Loader::begin(db).await?;
    let mut index = 0u64;
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if r.read_exact(&mut len).is_err() {
            anyhow::bail!("the backup is truncated (its last part is missing)");
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_SEALED {
            anyhow::bail!("the backup is damaged (a part is too large)");
        }
        let mut sealed = vec![0u8; len];
        r.read_exact(&mut sealed)
            .map_err(|_| anyhow::anyhow!("the backup is truncated"))?;
        let (plain, last) = match crypto::aead_open(
            key.bytes(),
            &aad(&header_hash, index, false),
            &sealed,
        ) {
            Ok(p) => (p, false),
            Err(_) => {
                match crypto::aead_open(key.bytes(), &aad(&header_hash, index, true), &sealed) {
                    Ok(p) => (p, true),
                    Err(_) => anyhow::bail!(
                        "part {index} of the backup does not open: the file was altered, or this is another keyring"
                    ),
                }
            }
        };
        carry.extend_from_slice(&plain);
        let mut start = 0;
        while let Some(pos) = carry[start..].iter().position(|b| *b == b'\n') {
            let line: Line = serde_json::from_slice(&carry[start..start + pos])
                .map_err(|_| anyhow::anyhow!("the backup's content is not readable"))?;
            start += pos + 1;
            let item = match line {
                Line::Table { table, columns } => Item::Table {
                    name: table,
                    columns: columns
                        .into_iter()
                        .map(|(name, int)| Column { name, int })
                        .collect(),
                },
                Line::Row(v) => Item::Row(v),
                Line::End { table, rows } => Item::EndTable { name: table, rows },
            };
            loader.item(item).await?;
        }
        carry.drain(..start);
        index += 1;
        if last {
            break;
        }
    }
    if !carry.is_empty() {
        anyhow::bail!("the backup ends in the middle of a line");
    }
    let mut rest = [0u8; 1];
    if r.read(&mut rest)? != 0 {
        anyhow::bail!("the backup has data after its last part");
    }
    let tables = loader.commit().await?;
    Ok(Summary {
        backup_id: header.backup_id,
        schema_version: header.schema_version,
        tables,
    })
}

/// Copies every table of `from` into `to` (migrated, empty), in one transaction on `to`.
pub async fn copy(from: &Db, to: &Db) -> anyhow::Result<Vec<(String, u64)>> {
    let a = dump::schema_version(from).await?;
    let b = dump::schema_version(to).await?;
    if a != b {
        anyhow::bail!(
            "the source is at schema version {a}, the target at {b}: run `custodian migrate` on the source first"
        );
    }
    let mut loader = dump::Loader::begin(to).await?;
    let exported = dump::export(from, &mut loader).await?;
    let loaded = loader.commit().await?;
    if exported != loaded {
        anyhow::bail!("the copy's row counts differ from the source's");
    }
    Ok(loaded)
}
