//! Who may call what: named bearer tokens with roles.
//!
//! `--tokens-file tokens.toml` lists tokens as `[[token]] name, role, sha256` (hex of the
//! secret's SHA-256; `secret` instead is accepted for tests and small setups). Roles:
//! `read` reads; `write` also creates, stops, approves and restarts runs and writes kv;
//! `admin` may do everything (membership, maintenance, export/import, executor admin);
//! `executor` only the executor routes; `cluster` only `/raft/*`. `--token-file`,
//! `--executor-token-file` and `--cluster-token-file` keep working: they are tokens named
//! `admin`, `executor` and `cluster` with those roles. A node with no token at all accepts
//! every request (loopback only, checked at start).
//!
//! A presented secret is hashed and compared with every stored digest in constant time,
//! so neither the secret nor which token nearly matched leaks through timing. Secrets are
//! never kept in memory past start, never logged; a token is shown by its name only.

use std::collections::BTreeSet;
use std::path::Path;

use flotilla_store::limits::{MAX_TOKENS, MAX_TOKEN_NAME_BYTES};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
    Admin,
    Executor,
    Cluster,
}

/// What a route demands of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Health, readiness, metrics, the dashboard's files.
    Nothing,
    Read,
    Write,
    Admin,
    Executor,
    Cluster,
}

impl Need {
    pub fn name(self) -> &'static str {
        match self {
            Need::Nothing => "no token",
            Need::Read => "read",
            Need::Write => "write",
            Need::Admin => "admin",
            Need::Executor => "executor",
            Need::Cluster => "cluster",
        }
    }
}

/// Where a node's tokens come from: read at start, and again on `SIGHUP`.
#[derive(Clone, Debug, Default)]
pub struct TokenFiles {
    /// `--tokens-file`: named tokens with roles.
    pub tokens_file: Option<std::path::PathBuf>,
    /// `--token-file`: one secret, the token `admin`.
    pub admin: Option<std::path::PathBuf>,
    /// `--executor-token-file`: the token `executor`.
    pub executor: Option<std::path::PathBuf>,
    /// `--cluster-token-file`: the token `cluster`.
    pub cluster: Option<std::path::PathBuf>,
}

impl TokenFiles {
    pub fn load(&self) -> Result<Tokens, String> {
        let mut tokens = match &self.tokens_file {
            Some(p) => Tokens::load(p)?,
            None => Tokens::default(),
        };
        for (name, role, path) in [
            ("admin", Role::Admin, &self.admin),
            ("executor", Role::Executor, &self.executor),
            ("cluster", Role::Cluster, &self.cluster),
        ] {
            let Some(path) = path else { continue };
            let secret = read_secret(path)?;
            let mut single = Tokens::default();
            single.add_secret(name, role, &secret).map_err(|e| format!("{}: {e}", path.display()))?;
            tokens
                .merge(single)
                .map_err(|e| format!("{}: {e} (the name is taken by {})", path.display(), name))?;
        }
        Ok(tokens)
    }
}

/// A token file's secret: its content without surrounding whitespace.
pub fn read_secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(secret)
}

impl Role {
    pub fn may(self, need: Need) -> bool {
        matches!(
            (self, need),
            (_, Need::Nothing)
                | (Role::Admin, _)
                | (Role::Write, Need::Read | Need::Write)
                | (Role::Read, Need::Read)
                | (Role::Executor, Need::Executor)
                | (Role::Cluster, Need::Cluster)
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
            Role::Executor => "executor",
            Role::Cluster => "cluster",
        }
    }
}

/// One known token: its name, role and the SHA-256 of its secret.
#[derive(Clone)]
struct Entry {
    name: String,
    role: Role,
    digest: [u8; 32],
}

/// The caller a request's token names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Every token a node accepts. Its `Debug` shows names and roles only.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| format!("{} ({})", e.name, e.role.name())))
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<FileToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToken {
    name: String,
    role: Role,
    sha256: Option<String>,
    secret: Option<String>,
}

impl Tokens {
    /// No token: every request is accepted.
    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a token given as its secret (the single-token files).
    pub fn add_secret(&mut self, name: &str, role: Role, secret: &str) -> Result<(), String> {
        if secret.is_empty() {
            return Err(format!("token {name:?} has an empty secret"));
        }
        self.push(name, role, Sha256::digest(secret.as_bytes()).into())
    }

    fn push(&mut self, name: &str, role: Role, digest: [u8; 32]) -> Result<(), String> {
        // A name is recorded in the replicated state (approvals, events): the state's own
        // rule for names applies.
        if name.len() > MAX_TOKEN_NAME_BYTES {
            return Err(format!("token name {name:?} is longer than {MAX_TOKEN_NAME_BYTES} bytes"));
        }
        flotilla_store::run::validate_name("token name", name)?;
        if self.entries.iter().any(|e| e.name == name) {
            return Err(format!("token name {name:?} is used twice"));
        }
        if self.entries.len() >= MAX_TOKENS {
            return Err(format!("at most {MAX_TOKENS} tokens"));
        }
        self.entries.push(Entry { name: name.to_string(), role, digest });
        Ok(())
    }

    /// Parses a tokens file (TOML). Errors name the token and never quote a secret.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let file: File = toml::from_str(text).map_err(|e| {
            // toml's message quotes the offending line, which may hold a secret.
            let at =
                e.span().map(|s| line_of(text, s.start)).map(|l| format!(" (line {l})")).unwrap_or_default();
            format!("invalid tokens file{at}: {}", redact(e.message()))
        })?;
        let mut tokens = Tokens::default();
        for t in file.token {
            let digest = match (&t.sha256, &t.secret) {
                (Some(hex), None) => parse_hex(hex).ok_or_else(|| {
                    format!("token {:?}: sha256 must be 64 hex digits (sha256sum of the secret)", t.name)
                })?,
                (None, Some(secret)) if !secret.is_empty() => Sha256::digest(secret.as_bytes()).into(),
                (None, Some(_)) => return Err(format!("token {:?} has an empty secret", t.name)),
                _ => return Err(format!("token {:?} needs exactly one of sha256 and secret", t.name)),
            };
            tokens.push(&t.name, t.role, digest)?;
        }
        Ok(tokens)
    }

    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read tokens file {}: {e}", path.display()))?;
        Tokens::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Adds every token of `other` (the single-token files beside a tokens file).
    pub fn merge(&mut self, other: Tokens) -> Result<(), String> {
        for e in other.entries {
            self.push(&e.name, e.role, e.digest)?;
        }
        Ok(())
    }

    /// The caller an `Authorization` header names, if any token matches.
    pub fn authenticate(&self, authorization: Option<&str>) -> Option<Caller> {
        let presented = authorization?.strip_prefix("Bearer ")?.trim();
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Every entry is compared in full: the time taken does not say which one matched.
        let mut found = None;
        for e in &self.entries {
            let diff = e.digest.iter().zip(&digest).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 && found.is_none() {
                found = Some(Caller { name: e.name.clone(), role: e.role });
            }
        }
        found
    }

    pub fn names(&self) -> BTreeSet<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).ok()?;
    Some(out)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

/// A parser message without quoted input (anything between backticks or quotes).
fn redact(msg: &str) -> String {
    let mut out = String::new();
    let mut quoted: Option<char> = None;
    for c in msg.chars() {
        match quoted {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                quoted = None;
            }
            Some(_) => {}
            None if c == '`' || c == '"' || c == '\'' => {
                out.push(c);
                quoted = Some(c);
            }
            None => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[token]]
name = "alice"
role = "admin"
secret = "alice-secret"

[[token]]
name = "ci"
role = "write"
sha256 = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"

[[token]]
name = "viewer"
role = "read"
secret = "viewer-secret"
"#;

    #[test]
    fn tokens_are_found_by_their_secret_and_named() {
        let t = Tokens::parse(FILE).unwrap();
        assert_eq!(
            t.authenticate(Some("Bearer alice-secret")).unwrap(),
            Caller { name: "alice".into(), role: Role::Admin }
        );
        // sha256("secret")
        assert_eq!(t.authenticate(Some("Bearer secret")).unwrap().name, "ci");
        assert!(t.authenticate(Some("Bearer nope")).is_none());
        assert!(t.authenticate(Some("alice-secret")).is_none());
        assert!(t.authenticate(None).is_none());
        assert!(!format!("{t:?}").contains("secret"), "{t:?}");
    }

    #[test]
    fn roles_allow_what_the_table_says() {
        use Need::*;
        let table = [
            (Role::Read, [true, true, false, false, false, false]),
            (Role::Write, [true, true, true, false, false, false]),
            (Role::Admin, [true, true, true, true, true, true]),
            (Role::Executor, [true, false, false, false, true, false]),
            (Role::Cluster, [true, false, false, false, false, true]),
        ];
        for (role, allowed) in table {
            for (need, want) in [Nothing, Read, Write, Admin, Executor, Cluster].into_iter().zip(allowed) {
                assert_eq!(role.may(need), want, "{role:?} {need:?}");
            }
        }
    }

    #[test]
    fn bad_files_are_refused_naming_the_token_and_never_the_secret() {
        let cases = [
            ("[[token]]\nname = \"a\"\nrole = \"admin\"\nsecret = \"s1\"\n[[token]]\nname = \"a\"\nrole = \"read\"\nsecret = \"s2\"\n", "used twice"),
            ("[[token]]\nname = \"a\"\nrole = \"root\"\nsecret = \"hunter2\"\n", "line"),
            ("[[token]]\nname = \"a\"\nrole = \"read\"\nsecret = \"\"\n", "empty secret"),
            ("[[token]]\nname = \"a\"\nrole = \"read\"\n", "exactly one"),
            ("[[token]]\nname = \"a\"\nrole = \"read\"\nsha256 = \"abc\"\n", "64 hex"),
            ("[[token]]\nname = \"\"\nrole = \"read\"\nsecret = \"hunter2\"\n", "token name"),
            ("[[token]]\nname = \"a\"\nrole = \"read\"\nsecret = \"hunter2\"\nextra = 1\n", "line"),
            ("[[token]\nname = \"hunter2\"", "line"),
        ];
        for (text, want) in cases {
            let err = Tokens::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(
                !err.contains("hunter2") && !err.contains("s1") && !err.contains("s2"),
                "{text:?}: {err}"
            );
        }
    }
}
