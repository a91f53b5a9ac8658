//! Export formats for SIEMs: JSON lines, and CSV whose columns are the JSON field names.

use std::io::Write;

use super::model::AuditEvent;

/// The CSV columns, in order (the JSON field names of an event).
pub const CSV_COLUMNS: [&str; 22] = [
    "seq",
    "id",
    "at",
    "actor_id",
    "actor",
    "action",
    "resource_type",
    "resource_id",
    "patient_id",
    "method",
    "path",
    "status",
    "ip",
    "user_agent",
    "request_id",
    "client_request_id",
    "outcome",
    "break_glass",
    "reason",
    "context",
    "prev_hash",
    "hash",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

impl Format {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "jsonl" | "json" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            _ => None,
        }
    }
}

pub fn write_header(out: &mut impl Write, format: Format) -> std::io::Result<()> {
    match format {
        Format::Jsonl => Ok(()),
        Format::Csv => writeln!(out, "{}", CSV_COLUMNS.join(",")),
    }
}

pub fn write_event(out: &mut impl Write, format: Format, e: &AuditEvent) -> std::io::Result<()> {
    match format {
        Format::Jsonl => {
            serde_json::to_writer(&mut *out, e)?;
            out.write_all(b"\n")
        }
        Format::Csv => {
            let opt = |o: &Option<String>| o.clone().unwrap_or_default();
            let cells = [
                e.seq.to_string(),
                e.id.clone(),
                e.at.clone(),
                opt(&e.actor_id),
                opt(&e.actor),
                e.action.clone(),
                opt(&e.resource_type),
                opt(&e.resource_id),
                opt(&e.patient_id),
                opt(&e.method),
                opt(&e.path),
                e.status.map(|s| s.to_string()).unwrap_or_default(),
                opt(&e.ip),
                opt(&e.user_agent),
                opt(&e.request_id),
                opt(&e.client_request_id),
                e.outcome.clone(),
                e.break_glass.to_string(),
                opt(&e.reason),
                e.context.clone(),
                e.prev_hash.clone(),
                e.hash.clone(),
            ];
            let line: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
            writeln!(out, "{}", line.join(","))
        }
    }
}

/// Quotes a CSV cell when needed, and defuses cells a spreadsheet would run as a
/// formula (leading `=`, `+`, `-`, `@`, tab or carriage return) with a leading `'`.
pub fn csv_cell(s: &str) -> String {
    let defused = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if defused.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", defused.replace('"', "\"\""))
    } else {
        defused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_defused() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_cell("@cmd"), "'@cmd");
        assert_eq!(csv_cell(r#"{"count":3}"#), "\"{\"\"count\"\":3}\"");
    }
}
