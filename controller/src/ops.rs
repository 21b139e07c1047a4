// SPDX-License-Identifier: Apache-2.0
//! The operator's commands: `sandboxer ps`, `sandboxer inspect ID` and `sandboxer console ID`,
//! clients of the daemon's `sandboxer.admin.v1.Admin` API on its socket (never its files).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use proto::admin::v1::admin_client::AdminClient;
use proto::admin::v1::{ConsoleRequest, InspectRequest, ListRequest, SandboxSummary};
use tonic::transport::Channel;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The daemon's socket could not be reached.
    #[error("cannot reach the sandboxer at {0} (is the daemon running? --socket names another)")]
    Connect(String, #[source] tonic::transport::Error),
    /// The daemon refused or failed the call.
    #[error("{}", .0.message())]
    Call(#[from] tonic::Status),
    /// Writing the output failed.
    #[error("cannot write the output")]
    Output(#[from] std::io::Error),
}

async fn client(socket: &Path) -> Result<AdminClient<Channel>, OpsError> {
    let channel = crate::client::connect(socket)
        .await
        .map_err(|e| OpsError::Connect(socket.display().to_string(), e))?;
    Ok(AdminClient::new(channel))
}

/// `sandboxer ps`: one line per sandbox (or the list as JSON).
pub async fn ps(socket: &Path, json: bool, out: &mut impl Write) -> Result<(), OpsError> {
    let list = client(socket)
        .await?
        .list(ListRequest {})
        .await?
        .into_inner()
        .sandboxes;
    if json {
        let rows: Vec<serde_json::Value> = list.iter().map(summary_json).collect();
        writeln!(out, "{}", serde_json::Value::Array(rows))?;
        return Ok(());
    }
    write!(out, "{}", ps_table(&list, SystemTime::now()))?;
    Ok(())
}

fn summary_json(s: &SandboxSummary) -> serde_json::Value {
    let created = s.created_at.as_ref().map(|t| t.to_string());
    let phases: std::collections::BTreeMap<&String, &u64> = s.start_phases_us.iter().collect();
    serde_json::json!({
        "id": s.id,
        "state": s.state,
        "created_at": created,
        "vcpus": s.vcpus,
        "mem_mib": s.mem_mib,
        "thread_ids": s.thread_ids,
        "from_template": s.from_template,
        "start_phases_us": phases,
    })
}

/// The start phase that is the whole Start.
const TOTAL: &str = "total";

/// The order Start runs its phases in, for the PHASES column.
const PHASE_ORDER: [&str; 5] = ["vm", "agent_ready", "agent_connect", "setup", "task_server"];

/// `ps`'s table: ID, STATE, AGE, VCPUS, MEM, THREADS (host thread ids: vCPUs then VMM),
/// START (total ms, and whether it was a template clone or a boot), PHASES (ms each).
pub fn ps_table(list: &[SandboxSummary], now: SystemTime) -> String {
    let header = [
        "ID",
        "STATE",
        "AGE",
        "VCPUS",
        "MEM",
        "THREADS",
        "START",
        "PHASES (ms)",
    ];
    let mut rows: Vec<[String; 8]> = vec![header.map(str::to_owned)];
    for s in list {
        let age = s
            .created_at
            .as_ref()
            .and_then(|t| SystemTime::try_from(*t).ok())
            .and_then(|t| now.duration_since(t).ok())
            .map_or_else(|| "-".to_owned(), age);
        let threads = if s.thread_ids.is_empty() {
            "-".to_owned()
        } else {
            s.thread_ids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let (start, phases) = start_columns(&s.start_phases_us, s.from_template);
        rows.push([
            s.id.clone(),
            s.state
                .strip_prefix("SANDBOX_")
                .unwrap_or(&s.state)
                .to_owned(),
            age,
            s.vcpus.to_string(),
            format!("{}Mi", s.mem_mib),
            threads,
            start,
            phases,
        ]);
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

fn start_columns(phases: &HashMap<String, u64>, from_template: bool) -> (String, String) {
    if phases.is_empty() {
        return ("-".to_owned(), "-".to_owned());
    }
    // The daemon records Start's whole time as `total`; without it, the phases' sum.
    let total = phases
        .get(TOTAL)
        .copied()
        .unwrap_or_else(|| phases.values().sum());
    let how = if from_template { "clone" } else { "boot" };
    let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
    let mut named: Vec<String> = PHASE_ORDER
        .iter()
        .filter_map(|p| phases.get(*p).map(|us| format!("{p}={}", ms(*us))))
        .collect();
    let mut others: Vec<_> = phases
        .iter()
        .filter(|(p, _)| !PHASE_ORDER.contains(&p.as_str()) && p.as_str() != TOTAL)
        .map(|(p, us)| format!("{p}={}", ms(*us)))
        .collect();
    others.sort();
    named.extend(others);
    (format!("{}ms {how}", ms(total)), named.join(" "))
}

/// A duration as `ps` shows ages: the largest unit, whole.
fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `sandboxer inspect ID`: the sandbox's record as JSON.
pub async fn inspect(socket: &Path, id: &str, out: &mut impl Write) -> Result<(), OpsError> {
    let json = client(socket)
        .await?
        .inspect(InspectRequest {
            sandbox_id: id.to_owned(),
        })
        .await?
        .into_inner()
        .json;
    writeln!(out, "{json}")?;
    Ok(())
}

/// `sandboxer upgrade`: has the daemon hand its sandboxes over to a new process of `binary`
/// (the running binary's path if `None`), then prints what happened (JSON with `json`).
pub async fn upgrade(
    socket: &Path,
    binary: Option<&Path>,
    json: bool,
    out: &mut impl Write,
) -> Result<(), OpsError> {
    let binary = match binary {
        Some(b) => std::path::absolute(b)?.to_string_lossy().into_owned(),
        None => String::new(),
    };
    let r = client(socket)
        .await?
        .upgrade(proto::admin::v1::UpgradeRequest { binary })
        .await?
        .into_inner();
    let mut pauses = r.pauses_us.clone();
    pauses.sort_unstable();
    let max = pauses.last().copied().unwrap_or(0);
    if json {
        let v = serde_json::json!({
            "old_pid": r.old_pid,
            "new_pid": r.new_pid,
            "sandboxes": r.sandboxes,
            "pauses_us": r.pauses_us,
            "failed": r.failed,
            "total_us": r.total_us,
            "phases_us": r.phases.iter().map(|p| (p.name.clone(), p.at_us)).collect::<Vec<_>>(),
            "freezes_us": r.freezes_us,
            "old_window_cpu_us": r.old_window_cpu_us,
            "new_window_cpu_us": r.new_window_cpu_us,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(
        out,
        "upgraded: pid {} -> {}, {} sandboxes handed over, longest pause {:.1} ms, total {:.1} ms",
        r.old_pid,
        r.new_pid,
        r.sandboxes,
        max as f64 / 1e3,
        r.total_us as f64 / 1e3
    )?;
    for f in &r.failed {
        writeln!(out, "lost: {f}")?;
    }
    Ok(())
}

/// `sandboxer console ID`: the guest's console log; with `follow`, until the VM ends.
pub async fn console(
    socket: &Path,
    id: &str,
    follow: bool,
    tail_bytes: u64,
    out: &mut impl Write,
) -> Result<(), OpsError> {
    let mut stream = client(socket)
        .await?
        .console(ConsoleRequest {
            sandbox_id: id.to_owned(),
            follow,
            tail_bytes,
        })
        .await?
        .into_inner();
    while let Some(chunk) = stream.message().await? {
        out.write_all(&chunk.data)?;
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_what_a_sandbox_is_doing() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let created = now - Duration::from_secs(150);
        let list = [
            SandboxSummary {
                id: "web-1".into(),
                state: "ready".into(),
                created_at: Some(created.into()),
                vcpus: 2,
                mem_mib: 384,
                thread_ids: vec![4101, 4102, 4103],
                start_phases_us: [
                    ("vm".into(), 720),
                    ("agent_ready".into(), 0),
                    ("setup".into(), 1100),
                    ("total".into(), 2000),
                ]
                .into(),
                from_template: true,
            },
            SandboxSummary {
                id: "new".into(),
                state: "created".into(),
                created_at: Some(now.into()),
                vcpus: 1,
                mem_mib: 256,
                ..Default::default()
            },
        ];
        let table = ps_table(&list, now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("ID     STATE    AGE"), "{table}");
        assert!(
            lines[1].contains("ready    2m   2      384Mi  4101,4102,4103  2.00ms clone"),
            "{table}"
        );
        assert!(
            lines[1].ends_with("vm=0.72 agent_ready=0.00 setup=1.10"),
            "{table}"
        );
        assert!(
            lines[2].starts_with("new    created  0s   1      256Mi  -"),
            "{table}"
        );
    }

    #[test]
    fn ages_use_the_largest_unit() {
        assert_eq!(age(Duration::from_secs(59)), "59s");
        assert_eq!(age(Duration::from_secs(60)), "1m");
        assert_eq!(age(Duration::from_secs(7200)), "2h");
        assert_eq!(age(Duration::from_secs(3 * 86400)), "3d");
    }
}
