//! How the PostgreSQL store reaches its database: the `postgres://` URL parsed and checked
//! before any connection, TLS set up from it, and the URL shown without its passwords.
//!
//! TLS to the database (`sslmode=require`, `verify-ca`, `verify-full`) always verifies the
//! server's certificate and name, against the URL's `sslrootcert` or the system's roots:
//! stricter than libpq's `require`, because a shared database across a network holds every
//! task's secrets. `prefer` (libpq's default) talks plain here, and plain text to a host
//! off this machine is warned about.

use std::time::Duration;

use postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;

use crate::error::StoreError;

/// The URL without its passwords, for messages and logs (also when it does not parse):
/// the user-info's password and a `password=` query parameter (any case) become `***`.
pub fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => {
            // The user-info ends at the last '@' before the path.
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rfind('@') {
                Some(at) => {
                    let (userinfo, host) = authority.split_at(at);
                    match userinfo.split_once(':') {
                        Some((user, _)) => format!("{scheme}://{user}:***{host}{path}"),
                        None => base.to_string(),
                    }
                }
                None => base.to_string(),
            }
        }
        None => base.to_string(),
    };
    if let Some(q) = query {
        let pairs: Vec<String> = q
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// Hosts of `config` that a plain-text connection would reach over a network: anything
/// but loopback addresses, `localhost` and Unix sockets.
fn remote_hosts(config: &postgres::Config) -> Vec<String> {
    use postgres::config::Host;
    config
        .get_hosts()
        .iter()
        .filter_map(|h| match h {
            Host::Tcp(name) => {
                let bare = name.trim_start_matches('[').trim_end_matches(']');
                let local = bare.eq_ignore_ascii_case("localhost")
                    || bare
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                (!local).then(|| name.clone())
            }
            Host::Unix(_) => None,
        })
        .collect()
}

/// The warning for a plain-text connection to a host off this machine: the password
/// and every task's secrets would cross the network readable.
pub(super) fn plain_text_warning(config: &postgres::Config, tls: &Tls) -> Option<String> {
    if matches!(tls, Tls::On(_)) {
        return None;
    }
    let remote = remote_hosts(config);
    if remote.is_empty() {
        return None;
    }
    let mode = match config.get_ssl_mode() {
        postgres::config::SslMode::Disable => "sslmode=disable",
        _ => "no sslmode or sslmode=prefer (which does not try TLS here)",
    };
    Some(format!(
        "the database connection to {} is plain text ({mode}): its password and every \
         task's spec and secrets cross the network readable; add \
         ?sslmode=verify-full&sslrootcert=/path/to/ca.pem to the URL",
        remote.join(", ")
    ))
}

/// How connections to the database are made.
#[derive(Clone)]
pub(super) enum Tls {
    /// `sslmode=disable` or `prefer`.
    Off,
    /// `sslmode=require`, `verify-ca` or `verify-full`: the certificate and the host name
    /// are verified.
    On(MakeRustlsConnect),
}

pub(super) fn connect(config: &postgres::Config, tls: &Tls) -> Result<Client, postgres::Error> {
    match tls {
        Tls::Off => config.connect(NoTls),
        Tls::On(t) => config.connect(t.clone()),
    }
}

/// Parse and check a `postgres://` URL. libpq's `sslrootcert` and the `verify-ca` /
/// `verify-full` modes, which the client library does not know, are taken out first.
pub(super) fn parse_config(url: &str) -> Result<(postgres::Config, Tls), StoreError> {
    let shown = redact(url);
    let err = |why: String| StoreError::PostgresUrl {
        url: shown.clone(),
        why,
    };
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut root_cert: Option<String> = None;
    let mut kept: Vec<(String, String)> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match (k.as_ref(), v.as_ref()) {
            ("sslrootcert", path) => root_cert = Some(path.to_string()),
            // Verified either way (see the module doc).
            ("sslmode", "verify-ca" | "verify-full") => {
                kept.push(("sslmode".into(), "require".into()));
            }
            _ => kept.push((k.into_owned(), v.into_owned())),
        }
    }
    let rest = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&kept)
        .finish();
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{rest}")
    };
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e: postgres::Error| err(format!("not a PostgreSQL connection URL ({e})")))?;
    if config.get_hosts().is_empty() {
        return Err(err("it names no host".to_string()));
    }
    if config.get_user().is_none() {
        return Err(err("it names no user".to_string()));
    }
    if config.get_dbname().is_none() {
        return Err(err("it names no database".to_string()));
    }
    let tls = match config.get_ssl_mode() {
        postgres::config::SslMode::Require => Tls::On(tls_connector(root_cert.as_deref(), &err)?),
        mode => {
            if let Some(path) = root_cert {
                return Err(err(format!(
                    "sslrootcert={path} is set, but sslmode={mode:?} talks plain here; use                      sslmode=verify-full to talk TLS and verify the server with it",
                    mode = format!("{mode:?}").to_lowercase()
                )));
            }
            Tls::Off
        }
    };
    config.application_name("delegate-manager");
    config.connect_timeout(Duration::from_secs(10));
    Ok((config, tls))
}

/// rustls on aws-lc-rs, trusting `root_cert` (PEM) or else the system's roots.
fn tls_connector(
    root_cert: Option<&str>,
    err: &dyn Fn(String) -> StoreError,
) -> Result<MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    err(format!(
                        "sslrootcert={path}: cannot read PEM certificates ({e})"
                    ))
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(err(format!(
                    "sslrootcert={path} holds no CA certificate; point it at the PEM file of                      the CA that signed the server's certificate"
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(err(
                    "sslmode asks for TLS, but the system has no CA certificates to verify the                      server with (install ca-certificates, or add sslrootcert=/path/to/ca.pem)"
                        .to_string(),
                ));
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(format!("cannot set up TLS ({e})")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `?password=` in the URL is hidden too, not only the user-info's.
    #[test]
    fn redact_hides_every_password_in_a_url() {
        for (url, shown) in [
            (
                "postgres://u:pw@db:5432/x?password=pw2&sslmode=disable",
                "postgres://u:***@db:5432/x?password=***&sslmode=disable",
            ),
            (
                "postgres://u@db/x?PASSWORD=pw",
                "postgres://u@db/x?PASSWORD=***",
            ),
            ("postgres://u:p@ss@db/x", "postgres://u:***@db/x"),
            ("postgres://u@db/x", "postgres://u@db/x"),
            ("not a url?password=pw", "not a url?password=***"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    /// Plain text to another host is warned about, not silent.
    #[test]
    fn plain_text_to_another_host_is_warned_about_and_loopback_is_not() {
        let warning = |u: &str| {
            let (config, tls) = parse_config(u).expect("parses");
            plain_text_warning(&config, &tls)
        };
        for remote in [
            "postgres://u@db.internal/x",
            "postgres://u@10.0.0.5/x?sslmode=prefer",
            "postgres://u@db.internal/x?sslmode=disable",
        ] {
            let w = warning(remote).unwrap_or_else(|| panic!("no warning for {remote}"));
            assert!(
                w.contains("plain text") && w.contains("sslmode=verify-full"),
                "{w}"
            );
        }
        for local in [
            "postgres://u@127.0.0.1/x",
            "postgres://u@localhost/x?sslmode=disable",
            "postgres://u@[::1]:5432/x",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/x",
        ] {
            assert_eq!(warning(local), None, "{local}");
        }
    }

    #[test]
    fn urls_that_cannot_work_are_refused_before_connecting() {
        let msg = |u: &str| match parse_config(u) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{u} accepted"),
        };
        assert!(
            msg("postgres://").contains("no host"),
            "{}",
            msg("postgres://")
        );
        let m = msg("postgres://u:secret@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        assert!(
            m.contains("/nonexistent/ca.pem") && !m.contains("secret"),
            "{m}"
        );
        assert!(m.contains("postgres://USER"), "{m}");
        let m = msg("postgres://u@h/db?sslrootcert=/etc/ca.pem");
        assert!(m.contains("sslmode=verify-full"), "{m}");
        let dir = tempfile::tempdir().expect("tempdir");
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate\n").expect("write");
        let m = msg(&format!(
            "postgres://u@h/db?sslmode=require&sslrootcert={}",
            not_pem.display()
        ));
        assert!(m.contains("holds no CA certificate"), "{m}");
        assert!(msg("postgres://u@h").contains("no database"));
        assert!(parse_config("postgres://u@127.0.0.1:5432/db").is_ok());
        assert!(parse_config("postgres://u@127.0.0.1:5432/db?sslmode=disable").is_ok());
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://u:pw@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(redact("postgres://u:pw@h:x/db"), "postgres://u:***@h:x/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
