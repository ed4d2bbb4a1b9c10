//! The control socket: one command a line, one reply line each (`ok ...` or `err ...`).
//! A Unix socket rather than a FIFO so that each client gets its own reply.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fuser::{INodeNo, Notifier};

use crate::state::Shared;

/// Longest command line accepted: every command is one short word.
const MAX_LINE_BYTES: u64 = 64;
/// Clients served at once: a test harness needs one or two.
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Drop every unsynced change, as a power loss would.
    Cut,
    /// Make every change durable, as fsyncs of every file and directory would.
    Sync,
    /// How much is unsynced.
    Stats,
}

impl Command {
    pub fn parse(line: &str) -> Option<Command> {
        match line.trim() {
            "cut" => Some(Command::Cut),
            "sync" => Some(Command::Sync),
            "stats" => Some(Command::Stats),
            _ => None,
        }
    }
}

/// Runs `command` and returns its reply line (without the newline).
pub fn execute(command: Command, shared: &Shared, notifier: &Notifier) -> String {
    match command {
        Command::Cut => {
            let (dropped, inos) = shared.cut();
            // Drop the kernel's cached pages and attributes of every inode it may hold, so
            // that reads see the backing files. Errors only mean the kernel had forgotten it.
            for ino in inos {
                let _ = notifier.inval_inode(INodeNo(ino), 0, -1);
            }
            format!("ok {dropped}")
        }
        Command::Sync => match shared.sync() {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("err {e}"),
        },
        Command::Stats => {
            let s = shared.stats();
            format!(
                "ok unsynced_files={} unsynced_bytes={} unsynced_entries={}",
                s.unsynced_files, s.unsynced_bytes, s.unsynced_entries
            )
        }
    }
}

/// Accepts clients until the listener fails; each one gets a thread.
pub fn serve(listener: UnixListener, shared: Arc<Shared>, notifier: Notifier) {
    let connections = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("lazyfs: control socket accept failed: {e}");
                continue;
            }
        };
        if connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            connections.fetch_sub(1, Ordering::SeqCst);
            let _ = writeln!(stream, "err too many control connections");
            continue;
        }
        let (shared, notifier, connections) = (shared.clone(), notifier.clone(), connections.clone());
        std::thread::spawn(move || {
            if let Err(e) = client(stream, &shared, &notifier) {
                eprintln!("lazyfs: control client: {e}");
            }
            connections.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn client(stream: UnixStream, shared: &Shared, notifier: &Notifier) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_LINE_BYTES + 1).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 > MAX_LINE_BYTES {
            writeln!(writer, "err line longer than {MAX_LINE_BYTES} bytes")?;
            return Ok(());
        }
        let reply = match Command::parse(&line) {
            Some(command) => execute(command, shared, notifier),
            None => format!("err unknown command {:?} (cut, sync, stats)", line.trim()),
        };
        writeln!(writer, "{reply}")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_surrounding_whitespace_and_nothing_else() {
        assert_eq!(Command::parse("cut\n"), Some(Command::Cut));
        assert_eq!(Command::parse(" sync "), Some(Command::Sync));
        assert_eq!(Command::parse("stats"), Some(Command::Stats));
        assert_eq!(Command::parse("cut now"), None);
        assert_eq!(Command::parse(""), None);
    }
}
