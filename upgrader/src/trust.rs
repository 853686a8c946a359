//! Trusted release keys and signature checks (minisign).
//!
//! Every `*.pub` in the keys directory is trusted, so a key can be rotated by shipping the
//! new one beside the old. No key at all means nothing is installed (fail closed): a host
//! that cannot check a release must not take one on trust.

use std::path::{Path, PathBuf};

use minisign_verify::{Error as VerifyError, PublicKey, Signature};

use crate::error::{UpgradeError, io};

pub struct TrustedKeys {
    dir: PathBuf,
    keys: Vec<(PathBuf, PublicKey)>,
}

impl TrustedKeys {
    /// Load every `*.pub`; an unreadable or malformed key is an error (an operator put it
    /// there on purpose), an empty directory is [`UpgradeError::NoTrustedKeys`].
    pub fn load(dir: &Path) -> Result<TrustedKeys, UpgradeError> {
        let mut keys = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(UpgradeError::NoTrustedKeys {
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(io(dir)(e)),
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "pub"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let key = PublicKey::decode(&text)
                .or_else(|_| PublicKey::from_base64(text.trim()))
                .map_err(|source| UpgradeError::BadKey {
                    path: path.clone(),
                    source,
                })?;
            keys.push((path, key));
        }
        if keys.is_empty() {
            return Err(UpgradeError::NoTrustedKeys {
                dir: dir.to_path_buf(),
            });
        }
        Ok(TrustedKeys {
            dir: dir.to_path_buf(),
            keys,
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verify `data` against a minisign signature text (`url` names it in errors).
    /// Returns the signature's trusted comment, which the signature covers.
    pub fn verify(&self, url: &str, data: &[u8], sig_text: &str) -> Result<String, UpgradeError> {
        let sig =
            Signature::decode(sig_text).map_err(|source| UpgradeError::MalformedSignature {
                url: url.to_string(),
                source,
            })?;
        for (path, key) in &self.keys {
            match key.verify(data, &sig, false) {
                Ok(()) => return Ok(sig.trusted_comment().to_string()),
                // Made by another key: try the next one.
                Err(VerifyError::UnexpectedKeyId) => continue,
                Err(source) => {
                    return Err(UpgradeError::BadSignature {
                        url: url.to_string(),
                        key: path.clone(),
                        source,
                    });
                }
            }
        }
        Err(UpgradeError::UntrustedKey {
            url: url.to_string(),
            dir: self.dir.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair(dir: &Path, name: &str) -> minisign::SecretKey {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().expect("keypair");
        let pk = kp.pk.to_box().expect("pk box").into_string();
        std::fs::write(dir.join(format!("{name}.pub")), pk).expect("write pk");
        kp.sk
    }

    fn sign(sk: &minisign::SecretKey, data: &[u8]) -> String {
        minisign::sign(None, sk, data, Some("t"), None)
            .expect("sign")
            .into_string()
    }

    #[test]
    fn several_keys_unknown_key_and_tampering() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            TrustedKeys::load(dir.path()),
            Err(UpgradeError::NoTrustedKeys { .. })
        ));
        let old = keypair(dir.path(), "old");
        let new = keypair(dir.path(), "new");
        let other_dir = tempfile::tempdir().expect("tempdir");
        let stranger = keypair(other_dir.path(), "x");
        let keys = TrustedKeys::load(dir.path()).expect("keys");
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys.verify("u", b"data", &sign(&old, b"data"))
                .expect("old"),
            "t"
        );
        keys.verify("u", b"data", &sign(&new, b"data"))
            .expect("new");
        assert!(matches!(
            keys.verify("u", b"data", &sign(&stranger, b"data")),
            Err(UpgradeError::UntrustedKey { .. })
        ));
        assert!(matches!(
            keys.verify("u", b"dat4", &sign(&new, b"data")),
            Err(UpgradeError::BadSignature { .. })
        ));
        assert!(matches!(
            keys.verify("u", b"data", "garbage"),
            Err(UpgradeError::MalformedSignature { .. })
        ));
    }
}
