//! `delegate setup`: the one command an operator runs after installing the package.
//!
//! It writes the manager URL, token, name, tags and upgrade group into the agent's config, keeping every
//! other setting (and comment) already there, owned `root:delegate` with mode 0640 so the
//! agent can read the token and nobody else can, then restarts `delegate.service`. The new
//! file is validated with the agent's own config loader *before* it replaces the old one:
//! bad arguments leave any existing config untouched.

use std::fs;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{Config, ConfigError, Env};
use delegate_protocol::check_upgrade_group;

/// The group the agent's unit runs as; it must be able to read the config.
pub const AGENT_GROUP: &str = "delegate";
/// The unit restarted after the config is written.
pub const UNIT: &str = "delegate.service";

/// What the operator passed.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// One URL, or each node's of a several-node manager.
    pub manager_urls: Vec<String>,
    pub token: String,
    pub name: Option<String>,
    pub tags: Vec<String>,
    /// `--upgrade-group`: written as `upgrade_group`; `None` keeps the config's own.
    pub upgrade_group: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "--token is empty or contains whitespace; paste it exactly as `delegate-manager token create` printed it"
    )]
    BadToken,
    #[error("--tags {0:?}: a tag may not be empty or contain whitespace (write --tags a,b)")]
    BadTag(String),
    /// `--upgrade-group` breaks the rule of group names; the text names the rule.
    #[error("--upgrade-group: {0}")]
    BadGroup(String),
    #[error(
        "{path} is not valid TOML, so setup cannot keep its other settings; fix or remove it first (`delegate config check` shows where)"
    )]
    Unparsable { path: PathBuf },
    /// The file as it would be written fails the agent's own checks; nothing was changed.
    #[error("nothing was changed; the new configuration would be invalid:\n{0}")]
    Invalid(ConfigError),
    #[error("cannot read {path} (run as root: sudo delegate setup ...)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path} (run as root: sudo delegate setup ...)")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "group {AGENT_GROUP:?} does not exist: install the delegate package first (it creates the user and group)"
    )]
    NoGroup,
    #[error(
        "the configuration is written, but `systemctl restart {UNIT}` failed ({0}); see `journalctl -u delegate`"
    )]
    Restart(String),
    #[error(
        "no token given: pass --token - (and the token on standard input), --token-file PATH, or set DELEGATE_TOKEN"
    )]
    NoToken,
    #[error("{0} holds no token: its first line must be the delegate token")]
    EmptyToken(String),
    #[error("cannot read the token from {from}")]
    ReadToken {
        from: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where `delegate setup` takes the token from. Only [`TokenSource::Argument`] puts it in
/// the process's command line, which every local user reads (`ps`, `/proc/PID/cmdline`)
/// for as long as setup runs: minutes, while the restart drains the agent (docs/security.md,
/// second review, finding 7). The other three never show it to anyone but root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token TOKEN`: still accepted, so existing provisioning scripts keep working,
    /// with [`ARGV_TOKEN_WARNING`] on standard error.
    Argument(String),
    /// `--token -`: the first line of standard input.
    Stdin,
    /// `--token-file PATH`: the first line of the file.
    File(PathBuf),
    /// `DELEGATE_TOKEN` in the environment (neither flag given).
    Env,
}

/// Said on standard error when the token came as an argument.
pub const ARGV_TOKEN_WARNING: &str = "warning: a token given as --token TOKEN is visible to every local user (ps, /proc/PID/cmdline) while setup runs, and in the shell's history; pass --token - and the token on standard input, --token-file PATH, or DELEGATE_TOKEN instead";

impl TokenSource {
    /// From the flags: `--token` (where `-` means standard input) or `--token-file`; the
    /// environment when neither is given.
    pub fn from_flags(token: Option<String>, token_file: Option<PathBuf>) -> TokenSource {
        match (token, token_file) {
            (Some(t), _) if t == "-" => TokenSource::Stdin,
            (Some(t), _) => TokenSource::Argument(t),
            (None, Some(p)) => TokenSource::File(p),
            (None, None) => TokenSource::Env,
        }
    }

    /// The token, trimmed of the line break around it. `render` checks it further.
    pub fn read(&self, env: &dyn Env, stdin: &mut dyn BufRead) -> Result<String, SetupError> {
        let first_line = |r: &mut dyn BufRead, from: String| {
            let mut line = String::new();
            // A token is one short line; reading more is not needed (and bounded).
            r.take(4096)
                .read_line(&mut line)
                .map_err(|source| SetupError::ReadToken { from, source })?;
            Ok::<_, SetupError>(line.trim().to_string())
        };
        let token = match self {
            TokenSource::Argument(t) => t.clone(),
            TokenSource::Stdin => first_line(stdin, self.origin())?,
            TokenSource::File(p) => {
                let f = fs::File::open(p).map_err(|source| SetupError::ReadToken {
                    from: self.origin(),
                    source,
                })?;
                first_line(&mut std::io::BufReader::new(f), self.origin())?
            }
            TokenSource::Env => env.var("DELEGATE_TOKEN").ok_or(SetupError::NoToken)?,
        };
        match self {
            TokenSource::Stdin | TokenSource::File(_) if token.is_empty() => {
                Err(SetupError::EmptyToken(self.origin()))
            }
            _ if token.is_empty() || token.chars().any(char::is_whitespace) => {
                Err(SetupError::BadToken)
            }
            _ => Ok(token),
        }
    }

    /// Where the token came from, for messages.
    fn origin(&self) -> String {
        match self {
            TokenSource::Argument(_) => "--token".into(),
            TokenSource::Stdin => "standard input".into(),
            TokenSource::File(p) => p.display().to_string(),
            TokenSource::Env => "DELEGATE_TOKEN".into(),
        }
    }
}

/// No environment: the written file alone must be a complete config.
struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Keys setup owns; any earlier value of them is replaced (`token_file` too, since the
/// token now lives in the file). `upgrade_group` is replaced only when `--upgrade-group`
/// is given, so re-running setup without it keeps the host in its group.
const OWNED_KEYS: &[&str] = &["manager_url", "token", "token_file", "name", "tags"];

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The new config text: `existing` without the keys setup owns, with the new ones at the
/// top. Pure, so it is tested without touching /etc.
pub fn render(existing: Option<&str>, s: &Settings) -> Result<String, SetupError> {
    if s.token.is_empty() || s.token.chars().any(char::is_whitespace) {
        return Err(SetupError::BadToken);
    }
    for t in &s.tags {
        if t.is_empty() || t.chars().any(char::is_whitespace) {
            return Err(SetupError::BadTag(t.clone()));
        }
    }
    if let Some(g) = &s.upgrade_group {
        check_upgrade_group(g).map_err(SetupError::BadGroup)?;
    }
    let mut out =
        String::from("# Written by `delegate setup`; the keys below replace earlier values.\n");
    let urls: Vec<String> = s.manager_urls.iter().map(|u| toml_string(u)).collect();
    match urls.as_slice() {
        [one] => out.push_str(&format!("manager_url = {one}\n")),
        many => out.push_str(&format!("manager_url = [{}]\n", many.join(", "))),
    }
    out.push_str(&format!("token = {}\n", toml_string(&s.token)));
    if let Some(n) = &s.name {
        out.push_str(&format!("name = {}\n", toml_string(n)));
    }
    if !s.tags.is_empty() {
        let tags: Vec<String> = s.tags.iter().map(|t| toml_string(t)).collect();
        out.push_str(&format!("tags = [{}]\n", tags.join(", ")));
    }
    if let Some(g) = &s.upgrade_group {
        out.push_str(&format!("upgrade_group = {}\n", toml_string(g)));
    }
    let Some(existing) = existing else {
        return Ok(out);
    };
    out.push('\n');
    // Drop top-level assignments of the owned keys (they sit before the first table
    // header); a multi-line array value is dropped up to its closing bracket.
    let mut in_table = false;
    let mut skipping_array = false;
    for line in existing.lines() {
        let t = line.trim_start();
        if skipping_array {
            if t.contains(']') {
                skipping_array = false;
            }
            continue;
        }
        if t.starts_with('[') {
            in_table = true;
        }
        if !in_table && !t.starts_with('#') {
            let key = t.split('=').next().unwrap_or("").trim().trim_matches('"');
            let owned =
                OWNED_KEYS.contains(&key) || (key == "upgrade_group" && s.upgrade_group.is_some());
            if t.contains('=') && owned {
                let value = t.split_once('=').map(|(_, v)| v.trim()).unwrap_or("");
                skipping_array = value.starts_with('[') && !value.contains(']');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    Ok(out)
}

/// Check `text` with the agent's own loader, as if it were at `path`.
fn validate(path: &Path, tmp: &Path) -> Result<(), SetupError> {
    match Config::load(tmp, &NoEnv) {
        Ok(_) => Ok(()),
        Err(mut e) => {
            for p in &mut e.problems {
                p.path = path.to_path_buf();
            }
            Err(SetupError::Invalid(e))
        }
    }
}

/// Write the config for `s` at `path` (validated first, then replaced in one rename),
/// owned by root and `group` (None: keep the caller's group, for tests) with mode 0640.
pub fn write_config(path: &Path, s: &Settings, group: Option<u32>) -> Result<(), SetupError> {
    let existing = match fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(SetupError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if let Some(text) = &existing
        && toml::from_str::<toml::Table>(text).is_err()
    {
        return Err(SetupError::Unparsable {
            path: path.to_path_buf(),
        });
    }
    let text = render(existing.as_deref(), s)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.setup-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let werr = |source| SetupError::Write {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)
            .map_err(werr)?;
        if let Some(gid) = group {
            std::os::unix::fs::fchown(&f, Some(0), Some(gid)).map_err(werr)?;
        }
        // The umask may have narrowed the mode given to open().
        f.set_permissions(fs::Permissions::from_mode(0o640))
            .map_err(werr)?;
        f.write_all(text.as_bytes()).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        validate(path, &tmp)?;
        fs::rename(&tmp, path).map_err(werr)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The agent's group id, which must exist on a packaged host.
pub fn agent_gid() -> Result<u32, SetupError> {
    match nix::unistd::Group::from_name(AGENT_GROUP) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(SetupError::NoGroup),
    }
}

/// Is systemd the init system here (so there is a unit to restart)?
pub fn systemd_booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// `systemctl restart delegate.service`: the agent drains, then starts with the new config.
pub fn restart_service() -> Result<(), SetupError> {
    let out = Command::new("systemctl")
        .args(["restart", UNIT])
        .output()
        .map_err(|e| SetupError::Restart(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SetupError::Restart(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            manager_urls: vec!["https://m.example:7700".into()],
            token: "dlg_abc".into(),
            name: Some("vm-1".into()),
            tags: vec!["a".into(), "b".into()],
            upgrade_group: None,
        }
    }

    #[test]
    fn upgrade_group_is_written_replaced_or_kept() {
        let old = "manager_url = \"http://old:1\"\nupgrade_group = \"old\"\n";
        // Without --upgrade-group the config's own group stays.
        let text = render(Some(old), &settings()).expect("render");
        let v: toml::Table = toml::from_str(&text).expect("valid toml");
        assert_eq!(v["upgrade_group"].as_str(), Some("old"), "{text}");
        // With it, the new one replaces it.
        let mut s = settings();
        s.upgrade_group = Some("canary".into());
        let text = render(Some(old), &s).expect("render");
        let v: toml::Table = toml::from_str(&text).expect("valid toml");
        assert_eq!(v["upgrade_group"].as_str(), Some("canary"), "{text}");
        // The written file loads with it.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("delegate.toml");
        write_config(&path, &s, None).expect("write");
        let c = Config::load(&path, &NoEnv).expect("loads");
        assert_eq!(c.upgrade_group.as_deref(), Some("canary"));
        // A bad one is refused with the rule, and nothing is written.
        s.upgrade_group = Some("Canary".into());
        let err = render(None, &s).expect_err("bad group refused");
        assert!(matches!(err, SetupError::BadGroup(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with("--upgrade-group: upgrade_group \"Canary\" is not a valid group")
                && text.contains("a-z, 0-9 and '-'"),
            "{text}"
        );
    }

    /// Second review, finding 7: the token can come from standard input, a file or the
    /// environment, none of which shows it in `ps`; `--token TOKEN` still works.
    #[test]
    fn the_token_comes_from_stdin_a_file_or_the_environment_not_only_the_command_line() {
        let no_env: [(&str, &str); 0] = [];
        let mut no_stdin = std::io::empty();
        let stdin = TokenSource::from_flags(Some("-".into()), None);
        assert_eq!(stdin, TokenSource::Stdin);
        let mut piped: &[u8] = b"dlg_from_stdin\nignored\n";
        assert_eq!(
            stdin.read(&no_env, &mut piped).expect("stdin"),
            "dlg_from_stdin"
        );
        let empty = stdin.read(&no_env, &mut no_stdin).expect_err("empty stdin");
        assert!(matches!(empty, SetupError::EmptyToken(_)), "{empty}");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        fs::write(&path, "dlg_from_file\n").expect("write");
        let file = TokenSource::from_flags(None, Some(path.clone()));
        assert_eq!(
            file.read(&no_env, &mut no_stdin).expect("file"),
            "dlg_from_file"
        );
        let missing = TokenSource::File(dir.path().join("nope"))
            .read(&no_env, &mut no_stdin)
            .expect_err("missing file");
        assert!(missing.to_string().contains("nope"), "{missing}");

        let env = TokenSource::from_flags(None, None);
        assert_eq!(env, TokenSource::Env);
        assert_eq!(
            env.read(&[("DELEGATE_TOKEN", "dlg_from_env")], &mut no_stdin)
                .expect("env"),
            "dlg_from_env"
        );
        assert!(matches!(
            env.read(&no_env, &mut no_stdin),
            Err(SetupError::NoToken)
        ));

        let arg = TokenSource::from_flags(Some("dlg_arg".into()), None);
        assert_eq!(arg, TokenSource::Argument("dlg_arg".into()));
        assert_eq!(arg.read(&no_env, &mut no_stdin).expect("arg"), "dlg_arg");
    }

    #[test]
    fn render_replaces_owned_keys_and_keeps_the_rest() {
        let old = "# comment\nmanager_url = \"http://old:1\"\ntoken_file = \"/x\"\ntags = [\n  \"x\",\n]\nconcurrency = 8\n\n[docker]\nname = \"not-top-level\"\n";
        let text = render(Some(old), &settings()).expect("render");
        let v: toml::Table = toml::from_str(&text).expect("valid toml");
        assert_eq!(v["manager_url"].as_str(), Some("https://m.example:7700"));
        assert_eq!(v["token"].as_str(), Some("dlg_abc"));
        assert_eq!(v["name"].as_str(), Some("vm-1"));
        assert_eq!(v["concurrency"].as_integer(), Some(8));
        assert!(v.get("token_file").is_none(), "{text}");
        assert_eq!(v["tags"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["docker"]["name"].as_str(), Some("not-top-level"));
        assert!(text.contains("# comment"));
    }

    #[test]
    fn several_manager_urls_are_written_as_a_list() {
        let mut s = settings();
        s.manager_urls = vec!["https://m1:7700".into(), "https://m2:7700".into()];
        let text = render(None, &s).expect("render");
        let v: toml::Table = toml::from_str(&text).expect("valid toml");
        let urls: Vec<&str> = v["manager_url"]
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|u| u.as_str())
            .collect();
        assert_eq!(urls, ["https://m1:7700", "https://m2:7700"]);
    }

    #[test]
    fn bad_token_and_tags_are_refused() {
        let mut s = settings();
        s.token = "dlg abc".into();
        assert!(matches!(render(None, &s), Err(SetupError::BadToken)));
        let mut s = settings();
        s.tags = vec!["".into()];
        assert!(matches!(render(None, &s), Err(SetupError::BadTag(_))));
    }

    #[test]
    fn a_bad_url_leaves_the_existing_config_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("delegate.toml");
        let before = "manager_url = \"http://ok:1\"\ntoken = \"dlg_x\"\n";
        fs::write(&path, before).expect("write");
        let mut s = settings();
        s.manager_urls = vec!["htp://typo".into()];
        let err = write_config(&path, &s, None).expect_err("bad url refused");
        let text = err.to_string();
        assert!(matches!(err, SetupError::Invalid(_)), "{text}");
        assert!(
            text.contains("manager_url") && text.contains(&path.display().to_string()),
            "{text}"
        );
        assert_eq!(fs::read_to_string(&path).expect("read"), before);
        let left: Vec<_> = fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(left.len(), 1, "no temp file left behind");
    }

    #[test]
    fn the_written_config_loads_and_is_0640() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("delegate.toml");
        write_config(&path, &settings(), None).expect("write");
        let c = Config::load(&path, &NoEnv).expect("loads");
        assert_eq!(c.name, "vm-1");
        assert_eq!(c.tags, vec!["a".to_string(), "b".to_string()]);
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }
}
