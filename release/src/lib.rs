//! `delegate-release`: `keygen`, `sign` and `publish`, the signing half of the trust chain.
//!
//! A crate of its own so the upgrader that runs as root on every host links only
//! `minisign-verify`: the secret-key code (minisign with scrypt, passphrase prompts) lives
//! on the machine that builds releases, and the host package does not install it.
//!
//! Layout of a release directory (serve it with any static web server, or with
//! `delegate-manager serve --releases DIR`):
//!
//! ```text
//! channels/<channel>.json                 the signed manifest (delegate_protocol::release)
//! channels/<channel>.json.minisig         its minisign signature
//! artifacts/<version>/delegate-<version>-<target>.tar.gz          the archive
//! artifacts/<version>/delegate-<version>-<target>.tar.gz.minisig  for offline `install`
//! ```
//!
//! Signatures are standard minisign: `minisign -Vm FILE -p KEY.pub` verifies them too.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use delegate_protocol::release::{
    Artifact, BINARY_NAME, MANIFEST_SCHEMA, Manifest, Version, artifact_trusted_comment,
};
use sha2::{Digest, Sha256};

use delegate_durable::{WriteError, write_atomic};
use delegate_protocol::release::ManifestError;

/// Environment variable holding the secret key's passphrase.
pub const PASSPHRASE_ENV: &str = "DELEGATE_KEY_PASSPHRASE";

/// Target triple these tools were built for: the default `--target` of `publish` (the
/// upgrader built in the same build picks the artifact of the same triple).
pub const BUILD_TARGET: &str = env!("DELEGATE_RELEASE_TARGET");

/// Every way a release tool fails; each names the file involved and keeps its cause.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists; refusing to overwrite a key")]
    KeyExists { path: PathBuf },
    #[error("{path}: cannot read the secret key (wrong passphrase? set {PASSPHRASE_ENV})")]
    Key {
        path: PathBuf,
        #[source]
        source: minisign::PError,
    },
    #[error("minisign could not {what}")]
    Minisign {
        what: &'static str,
        #[source]
        source: minisign::PError,
    },
    #[error("{path}: `version` exited with {status}; is it a delegate binary?")]
    BinaryFailed {
        path: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("{path}: `version` did not print a release version")]
    BinaryVersion {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("cannot encode the manifest")]
    Json(#[source] serde_json::Error),
    #[error(transparent)]
    Write(#[from] WriteError),
}

fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ReleaseError {
    let path = path.into();
    move |source| ReleaseError::Io { path, source }
}

fn minisign_err(what: &'static str) -> impl FnOnce(minisign::PError) -> ReleaseError {
    move |source| ReleaseError::Minisign { what, source }
}

/// Write `<dir>/<name>.pub` and `<dir>/<name>.key`. With `passphrase` the secret key is
/// encrypted (minisign's scrypt box); without, it is stored unprotected (tests, HSM-less
/// CI with the key in a secret store).
pub fn keygen(
    dir: &Path,
    name: &str,
    passphrase: Option<String>,
) -> Result<(PathBuf, PathBuf), ReleaseError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let pub_path = dir.join(format!("{name}.pub"));
    let key_path = dir.join(format!("{name}.key"));
    for p in [&pub_path, &key_path] {
        if p.exists() {
            return Err(ReleaseError::KeyExists { path: p.clone() });
        }
    }
    let kp = match passphrase {
        Some(p) => minisign::KeyPair::generate_encrypted_keypair(Some(p)),
        None => minisign::KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(minisign_err("generate a key pair"))?;
    let pk = kp
        .pk
        .to_box()
        .map_err(minisign_err("encode the public key"))?
        .into_string();
    let sk = kp
        .sk
        .to_box(Some("delegate release signing key"))
        .map_err(minisign_err("encode the secret key"))?
        .into_string();
    std::fs::write(&pub_path, pk).map_err(io(&pub_path))?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(io(&key_path))?;
        f.write_all(sk.as_bytes()).map_err(io(&key_path))?;
    }
    Ok((pub_path, key_path))
}

/// A secret key ready to sign (decrypted with the passphrase when it is protected).
pub struct Signer {
    sk: minisign::SecretKey,
}

impl Signer {
    pub fn load(path: &Path, passphrase: Option<String>) -> Result<Signer, ReleaseError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let key_err = |source| ReleaseError::Key {
            path: path.to_path_buf(),
            source,
        };
        let sk_box = minisign::SecretKeyBox::from_string(&text).map_err(key_err)?;
        // Try unencrypted first; a protected key needs the passphrase (or a prompt).
        let sk = match sk_box.clone().into_unencrypted_secret_key() {
            Ok(sk) if !sk.is_encrypted() => sk,
            _ => sk_box.into_secret_key(passphrase).map_err(key_err)?,
        };
        Ok(Signer { sk })
    }

    /// A minisign signature (prehashed) with `trusted` as its trusted comment.
    pub fn sign(&self, data: &[u8], trusted: &str) -> Result<String, ReleaseError> {
        Ok(minisign::sign(None, &self.sk, data, Some(trusted), None)
            .map_err(minisign_err("sign"))?
            .into_string())
    }

    /// Sign `file` into `file.minisig`.
    pub fn sign_file(&self, file: &Path, trusted: &str) -> Result<PathBuf, ReleaseError> {
        let data = std::fs::read(file).map_err(io(file))?;
        let sig = self.sign(&data, trusted)?;
        let out = PathBuf::from(format!("{}.minisig", file.display()));
        write_atomic(&out, sig.as_bytes())?;
        Ok(out)
    }
}

pub struct Publish<'a> {
    pub releases: &'a Path,
    pub channel: &'a str,
    pub binary: &'a Path,
    pub target: &'a str,
    pub expires_in: Duration,
}

/// What `publish` did.
#[derive(Debug, Clone)]
pub struct Published {
    pub version: String,
    pub manifest: PathBuf,
    pub artifact: PathBuf,
}

/// Pack `binary` for `target`, add it to the channel and (re)sign the channel manifest.
pub fn publish(p: &Publish<'_>, signer: &Signer) -> Result<Published, ReleaseError> {
    let version = binary_version(p.binary)?;
    let rel = format!(
        "artifacts/{version}/{BINARY_NAME}-{version}-{}.tar.gz",
        p.target
    );
    let artifact = p.releases.join(&rel);
    if let Some(dir) = artifact.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    pack(p.binary, &artifact)?;
    let bytes = std::fs::read(&artifact).map_err(io(&artifact))?;
    signer.sign_file(&artifact, &artifact_trusted_comment(&version, p.target))?;

    let channels = p.releases.join("channels");
    std::fs::create_dir_all(&channels).map_err(io(&channels))?;
    let manifest_path = channels.join(format!("{}.json", p.channel));
    let old = std::fs::read(&manifest_path)
        .ok()
        .and_then(|b| Manifest::parse(&b).ok());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // published_at never goes backwards for a channel: upgraders refuse that as a replay.
    let published_at = match &old {
        Some(o) => now.max(o.published_at + 1),
        None => now,
    };
    let mut artifacts = match old {
        Some(o) if o.version == version => o.artifacts,
        _ => BTreeMap::new(),
    };
    artifacts.insert(
        p.target.to_string(),
        Artifact {
            path: rel,
            sha256: hex::encode(Sha256::digest(&bytes)),
            size: bytes.len() as u64,
        },
    );
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        channel: p.channel.to_string(),
        version: version.clone(),
        published_at,
        expires_at: published_at + p.expires_in.as_secs(),
        artifacts,
    };
    let mut json = serde_json::to_vec_pretty(&manifest).map_err(ReleaseError::Json)?;
    json.push(b'\n');
    let sig = signer.sign(
        &json,
        &format!("delegate channel {} {version} {published_at}", p.channel),
    )?;
    // Signature first: a reader that sees the new manifest must never find the old
    // signature beside it for long; either order leaves a window, this one fails closed
    // (old manifest + new signature does not verify) rather than open.
    write_atomic(
        &PathBuf::from(format!("{}.minisig", manifest_path.display())),
        sig.as_bytes(),
    )?;
    write_atomic(&manifest_path, &json)?;
    Ok(Published {
        version,
        manifest: manifest_path,
        artifact,
    })
}

/// `<binary> version`, checked to be a version.
fn binary_version(binary: &Path) -> Result<String, ReleaseError> {
    // The binary may just have been written by a build or a test (see
    // `delegate_durable::retry_busy`): retry briefly while it is busy.
    let out = delegate_durable::retry_busy_blocking(|| {
        std::process::Command::new(binary)
            .arg("version")
            .stdin(std::process::Stdio::null())
            .output()
    })
    .map_err(io(binary))?;
    if !out.status.success() {
        return Err(ReleaseError::BinaryFailed {
            path: binary.to_path_buf(),
            status: out.status,
        });
    }
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    text.parse::<Version>()
        .map_err(|source| ReleaseError::BinaryVersion {
            path: binary.to_path_buf(),
            source,
        })
        .map(|v| v.to_string())
}

/// A tar.gz holding `binary` as `delegate` (mode 0755, root-owned, no timestamps that
/// would make two packs of the same binary differ).
fn pack(binary: &Path, out: &Path) -> Result<(), ReleaseError> {
    let mut data = Vec::new();
    std::fs::File::open(binary)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io(binary))?;
    let tmp = out.with_extension("tmp");
    let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        f,
        flate2::Compression::default(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, BINARY_NAME, data.as_slice())
        .map_err(io(&tmp))?;
    let gz = b.into_inner().map_err(io(&tmp))?;
    let f = gz.finish().map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, out).map_err(io(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use delegate_upgrader::trust::TrustedKeys;

    #[test]
    fn publish_then_verify_with_a_protected_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        let (_pk, sk) = keygen(&keys, "release", Some("s3cret".into())).expect("keygen");
        assert!(Signer::load(&sk, Some("wrong".into())).is_err());
        let signer = Signer::load(&sk, Some("s3cret".into())).expect("signer");
        let bin = dir.path().join("delegate");
        std::fs::write(&bin, "#!/bin/sh\necho 1.2.3\n").expect("bin");
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let releases = dir.path().join("releases");
        let p = Publish {
            releases: &releases,
            channel: "stable",
            binary: &bin,
            target: "x86_64-unknown-linux-gnu",
            expires_in: Duration::from_secs(3600),
        };
        let first = publish(&p, &signer).expect("publish");
        assert_eq!(first.version, "1.2.3");
        let trusted = TrustedKeys::load(&keys).expect("keys");
        let json = std::fs::read(&first.manifest).expect("manifest");
        let sig =
            std::fs::read_to_string(format!("{}.minisig", first.manifest.display())).expect("sig");
        trusted.verify("m", &json, &sig).expect("verifies");
        let m1 = Manifest::parse(&json).expect("parse");
        publish(&p, &signer).expect("again");
        let m2 =
            Manifest::parse(&std::fs::read(&first.manifest).expect("manifest")).expect("parse");
        assert!(
            m2.published_at > m1.published_at,
            "published_at moves forward"
        );
    }
}
