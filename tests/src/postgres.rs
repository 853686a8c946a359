//! A throwaway PostgreSQL server for tests: Debian's `postgresql` binaries, a cluster made
//! by `initdb` in a temp directory, served by `pg_ctl` on a free 127.0.0.1 port, stopped
//! and deleted on drop.
//!
//! The manager's multi-node mode keeps everything in PostgreSQL, and its tests need a real
//! server, not a mock: leases with `FOR UPDATE SKIP LOCKED` and `LISTEN/NOTIFY` are exactly
//! what a fake would get wrong. PostgreSQL refuses to run as root, so when the tests run as
//! root (CI does) the server runs as the `postgres` user the package creates, through
//! `runuser`. Authentication is `trust` on loopback only, inside a directory nobody else
//! can read; the socket directory is the temp directory too, so nothing touches
//! `/var/run/postgresql` or a cluster the machine may already have.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;

use crate::prereq::Missing;

/// Database and role the tests use.
pub const DATABASE: &str = "delegate";
pub const USER: &str = "delegate";

/// A running PostgreSQL cluster of one test.
pub struct Postgres {
    bin: PathBuf,
    /// Run the server's tools as this user (`Some("postgres")` when we are root).
    run_as: Option<String>,
    port: u16,
    // Dropped after the server is stopped (see `Drop`).
    dir: TempDir,
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb`.
pub fn bin_dir() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().map(|(_, b)| b).ok_or_else(|| {
        anyhow!(
            "no PostgreSQL server binaries under {}/<version>/bin: install them with \
             `apt-get install postgresql` (.ci/run does)",
            root.display()
        )
    })
}

/// Are PostgreSQL's server binaries here? [`Missing`] says what to install; under
/// `scripts/test --fast` the PostgreSQL tests are left out. Take it with
/// [`require!`](crate::require).
pub fn installed() -> Result<PathBuf, Missing> {
    crate::prereq::service("PostgreSQL", || {
        bin_dir().map_err(|_| {
            Missing::absent(
                "PostgreSQL (its server binaries, /usr/lib/postgresql/<version>/bin/initdb)",
                "apt-get install postgresql (.ci/run does)",
            )
        })
    })
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Postgres {
    /// A server for one test: [`Missing`] when PostgreSQL is not installed (or left out by
    /// `scripts/test --fast`), for [`require!`](crate::require); a server that is
    /// installed but does not start fails the test.
    pub fn for_test() -> Result<Postgres, Missing> {
        installed()?;
        Ok(Postgres::start()
            .unwrap_or_else(|e| panic!("PostgreSQL is installed but did not start: {e:#}")))
    }

    /// initdb, start on a free loopback port, create the test database. A port taken
    /// between picking and binding is retried with another.
    pub fn start() -> Result<Postgres> {
        let bin = bin_dir()?;
        let run_as = nix::unistd::geteuid()
            .is_root()
            .then(|| "postgres".to_string());
        let dir = tempfile::Builder::new()
            .prefix("delegate-pg-")
            .tempdir()
            .context("temp dir for PostgreSQL")?;
        if let Some(user) = &run_as {
            let u = nix::unistd::User::from_name(user)?
                .ok_or_else(|| anyhow!("no user {user:?}: install the postgresql package"))?;
            nix::unistd::chown(dir.path(), Some(u.uid), Some(u.gid))
                .with_context(|| format!("chown {} to {user}", dir.path().display()))?;
        }
        let mut pg = Postgres {
            bin,
            run_as,
            port: 0,
            dir,
        };
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                USER.as_ref(),
                "--auth=trust".as_ref(),
                "--no-sync".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
            ],
        )?;
        let mut last = None;
        for _ in 0..3 {
            pg.port = free_port()?;
            match pg.pg_ctl_start() {
                Ok(()) => {
                    pg.psql("postgres", &format!("CREATE DATABASE {DATABASE}"))?;
                    return Ok(pg);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("PostgreSQL did not start")))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://delegate@127.0.0.1:PORT/delegate`, for `--database`.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// Serve TLS too, with `pki`'s server certificate (for 127.0.0.1): the files are
    /// copied into the data directory for the server's user, and the setting is reloaded.
    pub fn enable_tls(&self, pki: &crate::tls::TestPki) -> Result<()> {
        let data = self.data_dir();
        for (from, to) in [
            (&pki.server_cert, "server.crt"),
            (&pki.server_key, "server.key"),
        ] {
            let dest = data.join(to);
            std::fs::copy(from, &dest).with_context(|| format!("copy {}", from.display()))?;
            std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if let Some(user) = &self.run_as {
                let u = nix::unistd::User::from_name(user)?
                    .ok_or_else(|| anyhow!("no user {user:?}"))?;
                nix::unistd::chown(&dest, Some(u.uid), Some(u.gid))?;
            }
        }
        // One statement per call: ALTER SYSTEM may not run in psql's implicit transaction.
        for sql in [
            "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
            "ALTER SYSTEM SET ssl_key_file = 'server.key'",
            "ALTER SYSTEM SET ssl = on",
            "SELECT pg_reload_conf()",
        ] {
            self.psql("postgres", sql)?;
        }
        Ok(())
    }

    /// A role that must log in with `password` over TCP (`scram-sha-256`; every other
    /// role stays `trust`), owning a database of its own name: for tests of how the
    /// manager gets its password.
    pub fn add_password_user(&self, user: &str, password: &str) -> Result<()> {
        self.psql(
            "postgres",
            &format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'"),
        )?;
        self.psql("postgres", &format!("CREATE DATABASE {user} OWNER {user}"))?;
        // Rewritten in place, so it keeps its owner and mode; the first matching line wins.
        let hba = self.data_dir().join("pg_hba.conf");
        let old =
            std::fs::read_to_string(&hba).with_context(|| format!("read {}", hba.display()))?;
        std::fs::write(
            &hba,
            format!("host all {user} 127.0.0.1/32 scram-sha-256\n{old}"),
        )
        .with_context(|| format!("write {}", hba.display()))?;
        self.psql("postgres", "SELECT pg_reload_conf()")?;
        Ok(())
    }

    /// The server's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Run one SQL command with `psql` over TCP; returns its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let port = self.port.to_string();
        let out = self.run(
            "psql",
            &[
                "-X".as_ref(),
                "-v".as_ref(),
                "ON_ERROR_STOP=1".as_ref(),
                "-At".as_ref(),
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                USER.as_ref(),
                "-d".as_ref(),
                db.as_ref(),
                "-c".as_ref(),
                sql.as_ref(),
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c synchronous_commit=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                opts.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        )
        .with_context(|| format!("PostgreSQL server log:\n{}", self.log_text()))?;
        Ok(())
    }

    /// Run a PostgreSQL tool (as `run_as` when set) in the temp directory; non-zero exit
    /// is an error carrying its stderr.
    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<Output> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .output()
            .with_context(|| format!("run {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{} {:?} failed ({}): {}",
                exe.display(),
                args,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Stop the server now (fast shutdown); `Drop` does the same if not called.
    pub fn stop(&mut self) -> Result<()> {
        if self.port == 0 {
            return Ok(());
        }
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "30".as_ref(),
                "stop".as_ref(),
            ],
        )?;
        self.port = 0;
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!(
                "stopping the test PostgreSQL in {}: {e:#}",
                self.dir.path().display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_postgres_answers_sql_on_loopback_and_is_gone_after_drop() {
        let mut pg = crate::require!(Postgres::for_test());
        let port = pg.port();
        assert!(
            pg.url().starts_with("postgres://delegate@127.0.0.1:"),
            "{}",
            pg.url()
        );
        assert_eq!(
            pg.psql(DATABASE, "SELECT current_database() || ' ' || 6 * 7")
                .expect("query"),
            "delegate 42"
        );
        pg.psql(
            DATABASE,
            "CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)",
        )
        .expect("create");
        assert_eq!(
            pg.psql(DATABASE, "SELECT count(*) FROM t").expect("count"),
            "1"
        );
        let dir = pg.dir.path().to_path_buf();
        pg.stop().expect("stops");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "still listening on {port} after stop"
        );
        drop(pg);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
